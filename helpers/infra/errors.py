"""User errors: what a researcher gave that cannot be used, said on one line (what, where, how to fix).

Every error class the workbench raises for bad input derives from `UserError`. The command line prints such an error
as `error: <message>` and exits with status 2 (`--debug` shows the traceback); the notebooks show the same line in
the failing cell (`install_notebook_handler`). Operating-system errors on the user's files (a folder where a file
was expected, no permission, a full disk) are put in the same form by `describe_os_error`.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from .env import env_flag

DEBUG_ENV = "HELPERS_DEBUG"  # set (e.g. by --debug) to see full tracebacks in the notebooks too


class UserError(Exception):
    """Bad input: the message names the file or setting and says how to fix it."""

    exit_status = 2  # of the command line


class BelowMinimumAgreement(UserError):
    """A run that finished and wrote everything, but agrees with its reference less than asked (`--min-agreement`):
    for scheduled runs, a status of its own."""

    exit_status = 3


def check_agreement(metrics: dict, minimum: float | None, where) -> None:
    """Raise BelowMinimumAgreement when the test set's agreement with the reference in `metrics` is below `minimum`."""
    if minimum is None:
        return
    found = metrics.get("test", {}).get("reference")
    if found is None:
        raise UserError("--min-agreement needs a test set and a reference in the config (reference: winner-116, or "
                        "--set reference=PATH.csv)")
    if found["agreement"] < minimum:
        raise BelowMinimumAgreement(
            f"agreement {found['agreement']:.4f} with {found['reference']} ({found['differing']} of {found['images']} "
            f"images differ) is below --min-agreement {minimum}; everything was written to {where}")


_OS_ADVICE = {
    errno.ENOENT: "no such file or folder: check the path",
    errno.EACCES: "permission denied: make it readable (and its folder writable where the workbench writes)",
    errno.EPERM: "operation not permitted: check the file's permissions and owner",
    errno.EISDIR: "is a folder, but a file is expected here",
    errno.ENOTDIR: "a file stands where a folder is expected (in this path)",
    errno.EEXIST: "already exists, and is not what the workbench expected there",
    errno.ENOSPC: "no space left on the device: free some space and run again; everything finished so far is kept",
    errno.EROFS: "read-only file system: write somewhere else (--output-dir, cache_dir)",
    errno.EDQUOT: "disk quota exceeded: free some space and run again; everything finished so far is kept",
}


def describe_os_error(e: OSError) -> str:
    """`<path>: <what is wrong and what to do>` for an OSError about a user's file."""
    where = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    advice = _OS_ADVICE.get(e.errno, e.strerror or str(e))
    return f"{where}: {advice}" if where is not None else advice


def one_line(e: BaseException) -> str:
    """The message of a user error, on one line."""
    text = describe_os_error(e) if isinstance(e, OSError) else str(e)
    return " ".join(text.split())


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, (UserError, OSError))


def debug_enabled() -> bool:
    return env_flag(DEBUG_ENV)


@contextmanager
def environment_flag(name: str, enabled: bool = True):
    """Within: the environment variable `name` set to 1 (when `enabled`), for this process and the kernels and
    processes it starts (they inherit it); as it was afterwards."""
    previous = os.environ.get(name)
    if enabled:
        os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def debug_mode(enabled: bool):
    """Within: full tracebacks, in this process and in the notebook kernels it starts."""
    return environment_flag(DEBUG_ENV, enabled)


def install_notebook_handler() -> None:
    """In an IPython kernel, show user errors as the one `error: ...` line the command line prints, not a traceback.

    The cell still fails (papermill stops the run and names the cell); HELPERS_DEBUG=1 restores the traceback.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or debug_enabled():
        return

    def show(shell, etype, value, tb, tb_offset=None):
        # IPython discards what a custom handler returns: show it as the error output (papermill reads that)
        lines = [f"error: {one_line(value)}"]
        # private, but the one hook that shows given lines as the error (the public showtraceback formats its own);
        # ipykernel overrides it to send the error message (pinned in tests/test_library_contracts.py)
        shell._showtraceback(etype, value, lines)
        return lines

    shell.set_custom_exc((UserError, OSError), show)


def show_notes(stream: str, prefix: str = "", wrap=None) -> None:
    """Send the workbench's log records (notes such as "every embedding came from the cache", and warnings) to
    `sys.<stream>` ("stdout" or "stderr", whichever object it is when a record comes) as plain lines, through `wrap`
    (a function of the text) if given, from INFO up; the last call says where, for the whole process."""
    import logging
    import sys

    class Notes(logging.StreamHandler):
        shows_notes = True

        @property
        def stream(self):
            return getattr(sys, stream)

        @stream.setter
        def stream(self, value):  # StreamHandler sets it; the stream is looked up as a record comes
            pass

        def format(self, record):
            text = prefix + super().format(record)
            return wrap(text) if wrap else text

    logger = logging.getLogger("helpers")
    for handler in [h for h in logger.handlers if getattr(h, "shows_notes", False)]:
        logger.removeHandler(handler)  # a process that was a notebook's and is now the command's shows them its way
    logger.addHandler(Notes())  # records still propagate (to a test's log capture); with a handler here,
    logger.setLevel(logging.INFO)  # Python's last-resort one, which printed warnings before, is not used
