"""`hydra/launcher=parallel`: Hydra's joblib launcher, which Ctrl-C stops without losing a job.

Hydra's launcher waits in joblib's Parallel; a Ctrl-C there raised in the launcher at
once, and joblib killed its workers, the jobs still writing their partial results among
them (seen under load: no results.json, a `.results.json.*` temp file). This launcher
takes the first Ctrl-C (or SIGTERM) as a request: it marks the sweep as stopping
(STOPPING_FILE: a queued job a worker starts now does not run), passes SIGINT on to its
workers (a terminal sends it to them as well; a job takes one stop, runner.cli), waits
for the running jobs to save what they computed, then raises the stop. A second Ctrl-C
raises at once, as before: a user who will not wait is not made to.

Imports Hydra's joblib launcher: read only where the [sweeps] extra is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from runner.callbacks import stop_workers
from runner.interrupts import stop_for
from runner.sweep_record import NOT_STARTED, STOPPING_FILE

RESEND_S = 1.0  # how often a stopped sweep's launcher signals its workers again

# Hydra instantiates only plugins named in the hydra_plugins namespace: the class is
# registered under this name (register_launcher), which conf/hydra/launcher/parallel.yaml
# gives as its _target_ ("joblib" in it: runner.callbacks tells a joblib sweep by it).
PLUGIN_MODULE = "hydra_plugins.gradient_runner_joblib"


class StoppableJoblibLauncher(JoblibLauncher):
    __module__ = PLUGIN_MODULE

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        stopping = Path(str(self.config.hydra.sweep.dir)) / STOPPING_FILE
        caught: list[int] = []
        done = threading.Event()  # the launch is over: no worker is signalled after it
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def stop_after_the_running_jobs(signum: int, frame: Any) -> None:
            if caught:  # a second stop: at once, the running jobs with it
                handler = previous[signum]
                if callable(handler):
                    handler(signum, frame)
                raise KeyboardInterrupt
            caught.append(signum)
            stopping.parent.mkdir(parents=True, exist_ok=True)
            stopping.touch()
            threading.Thread(target=_stop_workers, args=(_worker_pids(), done), daemon=True).start()

        for signum in previous:
            signal.signal(signum, stop_after_the_running_jobs)
        self.joblib["initializer"] = IgnoreCtrlC()
        try:
            runs = super().launch(job_overrides, initial_job_idx)
        finally:
            done.set()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            stopping.unlink(missing_ok=True)
        if not caught:
            return runs
        # every job has returned: the idle workers go now, as at a sweep's end (the
        # command exits through its stop, not through the callback that stops them there)
        stop_workers(self.config)
        stop = stop_for(caught[0])
        left = sum(1 for run in runs if _returned(run) == NOT_STARTED)
        if left:  # said by runner.interrupts.run_command, the command's last line
            stop.what = f"{left} job{'s' if left != 1 else ''} not started"  # type: ignore[attr-defined]
        raise stop


class IgnoreCtrlC:
    """Each worker's initializer: a new worker ignores Ctrl-C until a job sets its own
    handler (runner.cli._worker_signals). One that had not run a job yet printed
    multiprocessing's KeyboardInterrupt traceback over the sweep's lines. A class for
    its name in Hydra's `Joblib.Parallel(...)` line, where a function prints an address."""

    def __call__(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __repr__(self) -> str:
        return "IgnoreCtrlC"


def _returned(run: JobReturn) -> Any:
    """A job's return value; None for one that raised (its status FAILED)."""
    with contextlib.suppress(Exception):
        return run.return_value
    return None


def _worker_pids() -> list[int]:
    """The loky workers this process started."""
    import multiprocessing

    from joblib.externals.loky.backend.process import LokyProcess

    children = multiprocessing.active_children()
    return [c.pid for c in children if isinstance(c, LokyProcess) and c.pid is not None]


def _stop_workers(pids: list[int], done: threading.Event) -> None:
    """SIGINT to the workers now and every RESEND_S until the launch is over: a worker
    between jobs ignores it, one in a job stops it and saves (a job takes one stop), and
    one that began a job just as the sweep was marked stopping, past its check of the
    mark, is stopped too instead of running to its end while the launcher waits."""
    while True:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if done.wait(RESEND_S):
            return


def register_launcher() -> None:
    """Make the class instantiable by Hydra under PLUGIN_MODULE (Plugins.register, as
    runner.search registers its sweeper; Hydra's scan of hydra_plugins cannot see an
    editable install's packages)."""
    import sys

    from hydra.core.plugins import Plugins

    sys.modules.setdefault(PLUGIN_MODULE, sys.modules[__name__])
    Plugins.instance().register(StoppableJoblibLauncher)
