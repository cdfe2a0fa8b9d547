"""Commands run in processes of their own, for tests that kill them or run several at once, without the seconds a
fresh interpreter spends importing torch, open_clip and the workbench: each process is forked from multiprocessing's
fork server, which imported them once (and never ran a model, so no thread pool is forked half-way).

`start(main, argv, cwd)` returns a `Forked`, used as a `subprocess.Popen`: `communicate()` gives the process's stdout
and stderr, `returncode` its exit status (-9 when SIGKILL ended it). The process runs in `cwd`, with the caller's
environment as it is at the call.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
# what the fork server imports before it forks anything: what the commands these tests run need
_CONTEXT.set_forkserver_preload(["helpers.runs.pipeline", "helpers.__main__", "open_clip", "tests.fault_injection"])


def _run(main: Callable[[list[str]], int | None], argv: list[str], cwd: str, env: dict[str, str],
         stdout: str, stderr: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
    sys.exit(main(argv))


class Forked:
    def __init__(self, main: Callable[[list[str]], int | None], argv: list[str], cwd: Path):
        self._folder = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = (str(Path(self._folder.name) / name) for name in ("stdout", "stderr"))
        for path in (self._out, self._err):
            Path(path).touch()
        self._process = _CONTEXT.Process(target=_run, args=(main, list(argv), str(cwd), dict(os.environ),
                                                             self._out, self._err))
        self._process.start()

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise TimeoutError(f"{self._process.name} still ran after {timeout} s: killed")
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out, err = (Path(path).read_text() for path in (self._out, self._err))
        self._folder.cleanup()
        return out, err


def start(main: Callable[[list[str]], int | None], argv: list[str], cwd: Path) -> Forked:
    """`main(argv)` in a forked process working in `cwd`; its return value is the exit status."""
    return Forked(main, argv, cwd)
