"""The ``ld-ext`` command. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them together
(``SUBCOMMANDS``, the one table of names and modules). A subcommand whose module is not present
is left out of the command.

The subcommands' modules are imported lazily: ``ld-ext --help`` lists the subcommands from the
table without importing any of them, and a subcommand's module is imported (and its arguments
added) only when the command line names that subcommand, to run it or to show its ``--help``.

User errors (a missing path, an empty folder, a bad checkpoint, a refused --out, ...) are raised
by the library as ``ValueError``/``OSError``; here they become one line
``ld-ext: error: <message>`` on stderr and exit status 2, without a traceback; failures a run
meets (a loss that became NaN or infinite, a full disk, a frozen peer process) are one such line
with exit status 1. ``--debug`` (or the environment variable ``LD_EXT_TRACEBACK=1``) shows the
traceback instead. Ctrl-C at any time ends with the line ``ld-ext: interrupted`` and exit status
130, also while Python is still importing torch: the first line of ``ld_ext/__init__.py`` imports
``ld_ext/_startup.py``, which, when the process is the ``ld-ext`` command (the console script or
``python -m ld_ext``), installs a SIGINT handler that exits that way until ``main`` takes over. Library code reports
progress through :mod:`logging` (logger ``ld_ext``); the command sends it to stderr, one plain
line per message (``-q`` shows warnings only, ``-v`` debug).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import signal
import sys
import warnings

from ._startup import interrupted_while_starting
from ._version import __version__

# name -> (module, one-line help); the module is imported only when its subcommand is used
SUBCOMMANDS = {
    "pretrain": (
        "ld_ext.pretrain.cli",
        "pre-train an LD network (both stages, then the centre-sensitive landmark term) on a folder of medical images",
    ),
    "demo": ("ld_ext.demos", "pre-train on the MNI152 template shipped in nilearn and score the clusters"),
    "bench": ("ld_ext.bench", "benchmark the fused ops against plain PyTorch"),
    "finetune": ("ld_ext.tasks.segmentation", "transfer to segmentation (LD init vs random init)"),
    "probe": ("ld_ext.tasks.probe", "linear probe of frozen features (LD vs random-init, intensity, position)"),
    "landmark": ("ld_ext.tasks.landmarks", "centre-sensitive one-shot landmark localisation"),
    "shape-guided": ("ld_ext.tasks.shape_guided", "shape-guided cross-modality segmentation"),
    "info": ("ld_ext.cli", "print build facts (CUDA compiled?, CPU ISA, torch versions)"),
}

# Packages of the optional extras, for the message when one is missing.
_EXTRAS = {"nibabel": "medical", "pydicom": "medical", "nilearn": "demo", "scipy": None}

USER_ERRORS = (ValueError, OSError)


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for "info"
    pass


def run(args: argparse.Namespace) -> int:  # for "info"
    from .ops import build_info  # lazy, as every subcommand's code: the parser does not load it

    print(json.dumps(build_info(), indent=2))
    return 0


def _available(module: str) -> bool:
    """Whether ``module`` (dotted) exists, found on disk without importing it or its parent
    packages (``importlib.util.find_spec`` would run ``ld_ext.pretrain/__init__.py``)."""
    parts = module.split(".")
    spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec is not None


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help text, unless the text already names it or the
    default says nothing (None, False of a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or not action.option_strings
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
        ):
            return text
        d = action.default
        shown = " ".join(str(v) for v in d) if isinstance(d, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class _LazySubcommands(argparse._SubParsersAction):
    """The subcommands' action: when the command line names a subcommand, its module is imported
    and adds its arguments to that subcommand's parser, just before the parser reads the rest of
    the line (``--help`` included). The other subcommands' modules are never imported."""

    def __call__(self, parser, namespace, values, option_string=None):
        sub = self._name_parser_map.get(values[0])
        if sub is not None:
            _add_subcommand_arguments(sub)
        super().__call__(parser, namespace, values, option_string)


def _add_subcommand_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of the subcommand whose parser is ``p`` (once), from its module."""
    if getattr(p, "_ld_ext_loaded", False):
        return
    p._ld_ext_loaded = True  # type: ignore[attr-defined]
    importlib.import_module(p.get_default("_module")).add_arguments(p)
    for action in p._actions:  # options without a help text: still show their default
        if action.help is None and action.option_strings and action.default is not None and action.default is not False:
            action.help = ""
            action.help = HelpFormatter._get_help_string(None, action)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    """The ``ld-ext`` parser. It imports no subcommand module: the one a command line names is
    imported when ``parse_args`` reaches it (``_LazySubcommands``)."""
    parser = argparse.ArgumentParser(
        prog="ld-ext", description="Local Discrimination (LD) with fused kernels.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ld-ext {__version__}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_LazySubcommands)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        _add_common(p, argparse.SUPPRESS)
    return parser


def _add_common(parser: argparse.ArgumentParser, default=None) -> None:
    """--debug / -v / -q, accepted before or after the subcommand."""
    kw = {"default": default} if default is not None else {}
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error", **kw)
    parser.add_argument("-v", "--verbose", action="store_true", help="more messages (debug level)", **kw)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only", **kw)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def configure_logging(verbose: bool = False, quiet: bool = False):
    """Send the ``ld_ext`` loggers' messages to stderr as plain lines (the command's own setting;
    a program that imports ld_ext configures logging itself). Returns a function that undoes it."""
    log = logging.getLogger("ld_ext")
    saved = (log.level, log.propagate, warnings.showwarning)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.propagate = False
    warnings.showwarning = _show_warning  # one plain line per warning, no source echo

    def undo() -> None:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        warnings.showwarning = saved[2]

    return undo


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"ld-ext: warning: {text}", file=sys.stderr if file is None else file, flush=True)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"ld-ext: {record.levelname.lower()}: {msg}"
        return msg


def _missing_module_message(exc: ModuleNotFoundError) -> str:
    name = (exc.name or "").split(".")[0]
    extra = _EXTRAS.get(name)
    if name in _EXTRAS:
        how = f"pip install 'ld_ext[{extra}]'" if extra else f"pip install {name}"
        return f"this command needs the Python package {name!r}, which is not installed ({how})"
    return f"missing Python module {exc.name!r}: {exc}"


def error(message: str, code: int = 2) -> int:
    print(f"ld-ext: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on: KeyboardInterrupt
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("ld-ext: interrupted", file=sys.stderr, flush=True)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("LD_EXT_TRACEBACK", "0") == "1"
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    from .distributed import CollectiveError  # lazy: it loads torch.distributed, which the parser does not need

    undo_logging = configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        with _out_lock(args):
            return int(importlib.import_module(args._module).run(args) or 0)
    except ModuleNotFoundError as exc:
        if debug:
            raise
        return error(_missing_module_message(exc))
    except (CollectiveError, FloatingPointError) as exc:  # a frozen or dead peer, a NaN loss: exit 1
        if debug:
            raise
        return error(" ".join(str(exc).split()), code=1)
    except USER_ERRORS as exc:
        if debug:
            raise
        return error(_user_error_message(exc), code=1 if getattr(exc, "errno", None) in _DISK_ERRNOS else 2)
    finally:
        undo_logging()


# errno of a full disk or quota, a read-only file system, a file-size limit (ld_ext.atomic.DISK_ERRNOS)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


# subcommands whose --out is a folder that only one process at a time may write (pretrain locks
# its own --out in the library, on process 0 of a multi-process run)
LOCKED_OUT = ("finetune", "probe", "shape-guided", "demo", "bench")


def _out_lock(args: argparse.Namespace):
    """The lock of the subcommand's --out folder (``atomic.lock_folder``): another ld-ext process
    writing into it is refused with one line naming it."""
    if args.command not in LOCKED_OUT or not getattr(args, "out", None):
        return contextlib.nullcontext()
    from .atomic import lock_folder  # lazy: it loads NumPy, which the parser does not need

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return contextlib.nullcontext()  # the subcommand says what it expects
    lock = lock_folder(args.out, "--out")
    # outputs are never inputs: a later scan of a data folder that holds this --out skips it
    # (e.g. `ld-ext probe --images D --out D/probe`, then a run on D)
    from .data.readers import mark_output_folder  # lazy: ld_ext.data loads torch

    mark_output_folder(args.out)
    return lock


def _user_error_message(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
