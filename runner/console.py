"""Lines for the terminal, each block in one write.

A parallel sweep's workers share the terminal (or the pipe a script reads), and `print`
writes its text and its newline apart (two write calls, flushed or not): two jobs' lines
came out spliced, `running 20 steps ...running 2000000000 steps ...` and an empty line,
and a job's summary could be cut by another's. One write of whole lines (a pipe keeps a
write of up to 4096 bytes together) keeps each job's lines intact.
"""

from __future__ import annotations

import sys
from typing import TextIO


def say(*lines: str, err: bool = False) -> None:
    """Write lines (each may hold several) to stdout, or stderr, in one write, flushed."""
    stream: TextIO = sys.stderr if err else sys.stdout
    stream.write("".join(f"{line}\n" for line in lines))
    stream.flush()
