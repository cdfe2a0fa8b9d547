"""Processes forked from a server that imported torch, open_clip and the workbench once, without the seconds a fresh
interpreter spends importing them: commands, for tests that kill them or run several at once, and the notebooks'
kernels of the runs a test starts in its own process. The server is multiprocessing's fork server: it never ran a
model, so no thread pool is forked half-way.

`start(main, argv, cwd)` returns a `Forked`, used as a `subprocess.Popen`: `communicate()` gives the process's stdout
and stderr, `returncode` its exit status (-9 when SIGKILL ended it). The process runs in `cwd`, with the caller's
environment as it is at the call.

`launch_kernel` stands in for jupyter_client's: this checkout's kernel is forked (`ForkedKernel`, the Popen the
kernel manager signals and waits for), in a session of its own as jupyter_client starts it; any other kernel starts
as usual. The kernels of the runs that other processes start (a sweep's points, JupyterLab, another checkout) are
real ones, so jupyter_client's own start stays tested.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import forkserver
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.launcher import launch_kernel as launch_kernel_process

from helpers.infra.files import PROJECT_ROOT
from helpers.infra.jupyter import ensure_kernel

_CONTEXT = multiprocessing.get_context("forkserver")
# what the fork server imports before it forks anything: what the commands and kernels these tests run import
# (matplotlib's backend, read from MPLBACKEND at import, a forked kernel sets as its own import would: `_run_kernel`)
_CONTEXT.set_forkserver_preload(["helpers.runs.pipeline", "helpers.__main__", "helpers.research.ablation", "open_clip",
                                 "pandas", "matplotlib.pyplot", "scipy.special", "ot", "ipykernel.ipkernel",
                                 "tests.fault_injection"])
# what the server's libraries read from the environment at import (huggingface_hub's HF_HUB_OFFLINE, the OpenMP
# threads, matplotlib's configuration folder, ...): a kernel whose environment differs from the server's in these
# starts as usual
_READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "KMP_", "CUDA",
                   "PYTHON", "TQDM_", "PANDAS_", "MPL", "POT_")
# the backend ipykernel names in MPLBACKEND, for its inline figures, where the environment names none
_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# ... but what is read when used: inductor sets its cache folder in the environment itself, the first time it compiles
_READ_WHEN_USED = ("TORCHINDUCTOR_CACHE_DIR",)
# what a kernel imports afresh: the modules that choose at import what a kernel chooses otherwise (tqdm.auto picks the
# notebook's bar in a kernel; the workbench, the text bars of a saved run, HELPERS_SAVED_RUN). huggingface_hub keeps
# the text bar it picked in the server, for downloads, which no forked kernel makes (the hub is offline here).
_KERNEL_IMPORTS_AFRESH = ("helpers", "tqdm.auto", "tqdm.autonotebook")
_SESSION_ENVIRONMENT = dict(os.environ)  # imported with the tests' conftest, before any test has changed it
_server_environment: dict[str, str] | None = None


def _read_at_import(environment) -> dict[str, str]:
    return {name: value for name, value in environment.items()
            if name.startswith(_READ_AT_IMPORT) and name not in _READ_WHEN_USED}


def _start_server() -> dict[str, str]:
    """Start the fork server (once per process) in the environment the session started with, not in whatever a test
    has set; returns what its libraries read from that environment at import."""
    global _server_environment
    if _server_environment is None:
        current = dict(os.environ)
        os.environ.clear()
        os.environ.update(_SESSION_ENVIRONMENT)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(current)
        _server_environment = _read_at_import(_SESSION_ENVIRONMENT)
    return _server_environment


def _enter(cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked process: the working folder, environment and output files it would have been started with."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))


def _run(main: Callable[[list[str]], int | None], argv: list[str], cwd: str, env: dict[str, str],
         stdout: str, stderr: str) -> None:
    _enter(cwd, env, stdout, stderr)
    sys.exit(main(argv))


def _output_files(folder: str) -> tuple[str, str]:
    paths = tuple(str(Path(folder) / name) for name in ("stdout", "stderr"))
    for path in paths:
        Path(path).touch()
    return paths


class Forked:
    def __init__(self, main: Callable[[list[str]], int | None], argv: list[str], cwd: Path):
        self._folder = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = _output_files(self._folder.name)
        _start_server()
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


# --- kernels

@functools.cache
def kernel_command() -> list[str]:
    """The command of this checkout's kernel (`helpers.infra.jupyter`), before its connection file."""
    return KernelSpecManager().get_kernel_spec(ensure_kernel()).argv[:-1]


def _run_kernel(argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    os.setsid()  # a session and process group of its own: the kernel manager signals the group
    _enter(cwd, env, stdout, stderr)
    for name in [name for name in sys.modules if name in _KERNEL_IMPORTS_AFRESH or name.startswith("helpers.")]:
        del sys.modules[name]
    # what matplotlib, imported here, would have read: the MPLBACKEND the kernel sets as it starts (the server's
    # environment agrees with the kernel's in MPL*, so the rest of matplotlib's configuration is the kernel's own)
    import matplotlib

    matplotlib.rcParams["backend"] = os.environ.get("MPLBACKEND") or _INLINE_BACKEND
    sys.argv = argv
    runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)


class ForkedKernel:
    """A forked kernel, as jupyter_client's LocalProvisioner uses the Popen of a kernel: pid, poll, wait, signals.
    What the kernel wrote to its stdout and stderr is written to this process's stderr when it has ended."""

    stdin = stdout = stderr = None

    def __init__(self, connection_file: str, cwd: str, env: dict[str, str]):
        self._folder = tempfile.TemporaryDirectory(prefix="kernel-")
        self._outputs = _output_files(self._folder.name)
        self._process = _CONTEXT.Process(target=_run_kernel, args=(["ipykernel_launcher", "-f", connection_file],
                                                                    cwd, env, *self._outputs))
        self._process.start()
        self.pid = self._process.pid
        while self._process.exitcode is None and _process_group(self.pid) != self.pid:
            time.sleep(0.001)  # the kernel manager reads the group right after the start: it must be the kernel's

    def poll(self) -> int | None:
        """The exit status once the kernel has ended (its output then written out), else None."""
        if self._process.exitcode is not None and self._folder is not None:
            for path in self._outputs:
                sys.stderr.write(Path(path).read_text())
            self._folder.cleanup()
            self._folder = None
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(kernel_command(), timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def launch_kernel(cmd: list[str], stdin=None, stdout=None, stderr=None, env=None, independent=False, cwd=None,
                  **kwargs):
    """jupyter_client.launcher.launch_kernel, forking this checkout's kernel started in the project folder (as
    `helpers.runs.notebooks` starts it) when its environment agrees with the fork server's in what the server's
    libraries read at import; any other kernel is started by jupyter_client."""
    cwd = cwd or os.getcwd()  # papermill starts its kernels in the folder it changed to
    forkable = (cmd[:-1] == kernel_command() and Path(cwd).resolve() == PROJECT_ROOT
                and env is not None and stdin is stdout is stderr is None and not independent and not kwargs
                and _read_at_import(env) == _start_server())
    if not forkable:
        return launch_kernel_process(cmd, stdin=stdin, stdout=stdout, stderr=stderr, env=env, independent=independent,
                                     cwd=cwd, **kwargs)
    return ForkedKernel(cmd[-1], str(cwd), {**env, "JPY_PARENT_PID": str(os.getpid())})  # as launch_kernel sets it
