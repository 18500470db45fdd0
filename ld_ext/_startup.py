"""The ``ld-ext`` command's Ctrl-C guard for its start-up, installed by the first line of
``ld_ext/__init__.py``: before any other import of the package (``logging``, ``argparse``, torch),
so that the time in which a Ctrl-C can still end in a traceback is only Python's own start-up
(interpreter, ``site``, the console script's first line), measured in docs/reference.md.

It imports nothing that Python has not loaded already (``_signal`` is built in; ``os`` and ``sys``
are loaded by every interpreter start), so installing it costs no import time itself. A program
that imports ld_ext keeps its own Ctrl-C handling: the guard is installed only when the process is
the ``ld-ext`` command (the console script or ``python -m ld_ext``). ``ld_ext.cli.main`` gives
SIGINT back to Python's handler once it runs.
"""

import os
import sys

import _signal


def started_as_command() -> bool:
    """Whether this process is the ``ld-ext`` command: the console script, or ``python -m ld_ext``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("ld-ext", "ld-ext.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and argv[i + 1 : i + 2] == ["ld_ext"] or a == "-mld_ext" for i, a in enumerate(argv))


def interrupted_while_starting(signum, frame) -> None:
    """SIGINT before ``main`` runs (the imports of torch take seconds): one line, exit 130."""
    try:
        os.write(2, b"ld-ext: interrupted\n")
    finally:
        os._exit(130)


def guard_start_up() -> None:
    """In the ``ld-ext`` command only: a Ctrl-C before ``main`` starts ends the process with one
    line, without the traceback of an interrupted import."""
    if started_as_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        try:
            _signal.signal(_signal.SIGINT, interrupted_while_starting)
        except ValueError:  # not the main thread
            pass


guard_start_up()
