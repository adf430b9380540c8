"""`python -m runner.compare`: do the frameworks agree, and which way is fastest?

Reads finished minimize and derivatives runs from any MLflow tracking URI (the runner's
SQLite store by default), keeps one row per configuration (Row.key: backend, mode,
optimizer, dtype, steps, problem, device; of repeats of one configuration the latest;
a derivatives run's: backend, dtype, problem, device), and writes (a
backend run with options other than its conf/backend defaults is a backend of its own,
named with them: `tf+jit_compile`, `numpy+convention=tf`):

- comparison.md / comparison.csv / comparison.json: one row per configuration with final
  x and loss, the error to the analytic optimum, steps, compile and per-step time, and the
  per-step time relative to the fastest finished row (1.0x; a diverged run is no
  reference); a problem and a device column where the rows differ in them; a sweep's
  report lists its skipped and failed jobs after the table, one line each, with why;
- agreement.csv (and a section of comparison.md): per mode and dtype, the two backends
  whose final x are furthest apart in ulps of the rows' dtype, their largest |dx| and ulps (the
  csv: float32 ulps, and float64 ulps for float64 runs); a row "all" per dtype compares
  every mode with every other ("across modes" where one backend ran them all); and per
  such group its trajectories step by step, at every step all its rows recorded
  (identical, or the first step two rows differ at and the largest difference in ulps);
- convergence.png (|loss - loss*| against step, from each run's per-step `loss`
  metric) and step_time.png (per-step time, log scale);
- for derivatives runs (task=derivatives; `--mode derivatives` selects them alone), a
  section of comparison.md and derivatives.csv: per point (problem, x0, dtype) the
  analytic values, then each run's values with their distance from them in ulps of the
  dtype; and per point two or more backends evaluated, the pair and the value furthest
  apart in ulps.

The files are logged as artifacts of a comparison run (tag runner.kind=comparison) in
the same experiment, or of an existing run (the sweep's parent when a multirun ends).
Values come from each run's results.json artifact (exact floats, vectors included);
a run whose artifact cannot be read falls back to its MLflow metrics, tags and params.
The package imports no framework; MLflow is imported inside functions.

- rows:      Row, a results.json as a row, labels, order, relative step time
- store:     finding the matching runs in an MLflow store, each as a row
- agreement: cross-backend agreement of final x, in ulps
- trajectories: each row's recorded trajectory, from its folder or from MLflow
- stepwise:  a group's trajectories compared step by step, in ulps
- derivatives: a derivatives run as a row; the backends' agreement per point, in ulps
- holes:     a sweep's skipped and failed jobs, named, with why
- output:    tables, comparison.md/.csv/.json, agreement.csv, plots
- derivative_tables: the derivatives runs' tables, their section, derivatives.csv
- logged:    the files and agreement metrics logged to an MLflow run
- report:    compare() and compare_folder(): one report from end to end
- cli:       the command line
"""
