"""`python -m runner.background`: a single run's own upload, started detached by the run.

`python -m runner` writes the run's files, then starts this
(runner.upload_process.start_background_upload) and returns. It waits for the run's
process to exit before importing anything heavy, so its start-up (NumPy, then MLflow:
~1-2 s of CPU) does not compete with the run's last moments on a machine with few cores,
then runs `python -m runner.upload --background` on the run folder: logged once, as a
live run is, with the status its results.json records, output in <run dir>/upload.log.

Arguments: --after-pid=<the run's pid>, then upload's own (--lock-fd, --experiment,
the run folder). The store's URI comes in MLFLOW_TRACKING_URI, never argv.
"""

from __future__ import annotations

import os
import sys
import time

WAIT_LIMIT_S = 30.0


def wait_for_exit(pid: int, limit_s: float = WAIT_LIMIT_S) -> None:
    """Until process `pid`, this one's parent, has exited (or limit_s has passed).

    A process is re-parented the moment its parent exits, so its parent id changes
    then; a zombie parent, not yet reaped by its own parent, counts as exited.
    """
    deadline = time.monotonic() + limit_s
    while os.getppid() == pid and time.monotonic() < deadline:
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].startswith("--after-pid="):
        wait_for_exit(int(args.pop(0).split("=", 1)[1]))
    from runner.upload import main as upload

    return upload(["--background", *args])


if __name__ == "__main__":
    sys.exit(main())
