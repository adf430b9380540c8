"""`python -m runner.bench`: where every backend x mode stands, measured side by side.

Everything that is compared is measured in one process, interleaved repeat by repeat
(runner, hand-written, runner, ...), and each figure is the best of N: on a shared
machine the load moves during a run, and only figures taken under the same load make
honest ratios. Each framework is imported once, by the runner's own plugin loader.
Costs that only a fresh process shows (start-up, tracking, sweeps, peak memory,
persistent compilation caches) are measured with the real CLI in subprocesses.

- cases:   settings, the backend x mode variants and their specs
- loops:   the hand-written reference loops, the numba floor, NumPy baselines
- measure: in-process timing (scalar cells, floor, n-dim quadratic)
- process: subprocess timing (start-up, tracking, sweep, peak RSS, compile cache)
- targets: the targets of issue 7 and their verdicts
- report:  results.md (with the commit, machine and environment it ran on), plots
- logged:  the MLflow run (metrics, params, tags as a run's)
- run:     command line, provenance, outputs

See README "Benchmarks" for the results and how to read them.
"""
