"""The forked kernels of the tests (tests/forked.py) are this checkout's kernels as jupyter_client starts them: a
process group of their own, the kernel's own choices at import (tqdm's notebook bar), and a kernel whose environment
differs in what the fork server's libraries read at import is started as usual."""

import subprocess
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from helpers.infra.jupyter import ensure_kernel

from . import forked
from .conftest import PROJECT_ROOT

PROBE = ("import os, matplotlib, tqdm.auto, tqdm.notebook; print(issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm), "
         "os.getpgid(0) == os.getpid(), os.getenv('OMP_NUM_THREADS'), matplotlib.get_backend())")


def _run_in_kernel(code: str, sockets: Path) -> tuple[object, str]:
    manager = KernelManager(kernel_name=ensure_kernel(), transport="ipc", ip=str(sockets))  # as the runs start them
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        printed = []
        reply = client.execute_interactive(code, output_hook=lambda m: printed.append(m["content"].get("text", "")),
                                           timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        return manager.provisioner.process, "".join(printed).strip()
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("threads", ["same", "other"])
def test_this_checkouts_kernel_is_forked_unless_its_environment_differs(monkeypatch, tmp_path, threads):
    monkeypatch.chdir(PROJECT_ROOT)
    server = forked._start_server()
    if threads == "other":  # read by OpenMP when the server imported torch
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
    expected = forked.ForkedKernel if threads == "same" else subprocess.Popen
    process, printed = _run_in_kernel(PROBE, tmp_path / "kernel")
    assert isinstance(process, expected)
    notebook_bar, own_group, omp, backend = printed.split()
    assert (notebook_bar, own_group, backend) == ("True", "True", "module://matplotlib_inline.backend_inline")
    assert omp == ("3" if threads == "other" else str(server.get("OMP_NUM_THREADS")))
    assert process.poll() is not None  # ended, and its exit seen
