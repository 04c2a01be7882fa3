"""The process entry point of ``python -m pefref`` and ``torchrun -m pefref``: the command line, and under torchrun
an exit that leaves the process group and skips the interpreter's teardown once the command is done
(:func:`pefref.experiments.distributed.exit_process`). torch is imported only under torchrun."""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main() -> None:
    """Run the command line; under torchrun, end the process with its exit status through ``exit_process``."""
    from pefref.cli.app import app

    if not ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ):
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    from pefref.experiments.distributed import exit_process

    exit_process(code)
