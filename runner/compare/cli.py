"""The command line of `python -m runner.compare`: flags in, the report's tables out.

A failure the user can act on (no store, no such experiment, nothing matches, a store
that refuses) is one line on stderr and an exit code, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from runner.command_line import OneLineParser, default_out_dir, out_dir_error
from runner.compare.report import compare
from runner.errors import RunnerError
from runner.tracking_store import DEFAULT_EXPERIMENT, in_command_flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m runner.compare",
        description="Compare finished minimize runs in MLflow: a table per backend x mode "
        "(x optimizer, dtype), cross-backend agreement of final x, convergence and "
        "per-step time plots; and derivatives runs (task=derivatives): each value, its ulps "
        "from the analytic value, and the backends' agreement per point. Files go to --out "
        "and to a comparison run in MLflow.",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI to read (default: the runner's store, "
        "sqlite:///<cwd>/outputs/mlflow.db)",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="(default: %(default)s)")
    parser.add_argument(
        "--sweep", help="only runs of this sweep (tag sweep_id); 'latest' for the newest sweep"
    )
    for name, example in (("backend", "jax,torch"), ("mode", "graph"), ("dtype", "float32")):
        parser.add_argument(
            f"--{name}",
            action="append",
            help=f"only these {name}s; repeat or comma-separate (e.g. {example})"
            + (
                "; 'graph' matches every graph/<update>; 'derivatives' the derivatives runs"
                if name == "mode"
                else ""
            )
            + ("; 'tf' matches tf+<options> too" if name == "backend" else ""),
        )
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument(
        "--no-log", action="store_true", help="write the files only; log nothing to MLflow"
    )
    args = parser.parse_args(argv)
    given = args.out is not None
    args.out = args.out or default_out_dir("compare")
    if problem := out_dir_error(args.out, given):
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = compare(
            args.tracking_uri,
            args.experiment,
            sweep_id=args.sweep,
            backends=args.backend,
            modes=args.mode,
            dtypes=args.dtype,
            out_dir=args.out,
            log=not args.no_log,
        )
    except RunnerError as exc:
        print(f"error: {in_command_flags(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # the store refused: say so in one line
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: tracking store: {message}", file=sys.stderr, flush=True)
        return 4
    for warning in report.warnings:  # what the table may lack, where scripts look for it
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    print(report.text)
    print(f"\nfiles in {report.out_dir}")
    if report.run_id:
        print(f"logged to MLflow run {report.run_id} (experiment {report.experiment})")
    return 0
