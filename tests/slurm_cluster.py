"""A single-node Slurm cluster on this machine, for the tests of sweeps on Slurm (and for trying a sweep by hand):
Debian's `slurm-wlm` and `munge` packages (`make setup` installs them as root where they are missing), run as root,
everything in one folder (munge's key and socket, slurm.conf, the controller's state, slurmd's spool, the logs).

The node is this machine as `slurmd -C` sees it (its CPUs and memory); one partition; no accounting database (so
`sacct` answers nothing: job states come from `squeue` and `scontrol`). The daemons run in the foreground as this
process's children, so that exactly those are stopped, by their pids.

By hand, as root, from the project root:

    .venv/bin/python -m tests.slurm_cluster /tmp/cluster     # starts it, prints `export SLURM_CONF=...`, waits
    # in another shell: export SLURM_CONF=/tmp/cluster/slurm.conf; sinfo; python -m helpers sweep ... --executor slurm
    # Ctrl-C stops it (its jobs cancelled first)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PARTITION = "sweeps"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
KILL_WAIT_S = 2  # between the SIGTERM and the SIGKILL of a job Slurm ends (default 30): cancelled jobs end at once


class ClusterUnavailable(RuntimeError):
    """The cluster cannot start here; the message says why."""


@dataclass
class SlurmCluster:
    folder: Path
    node: str
    cpus: int
    memory_mb: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm command needs to talk to this cluster (its jobs inherit it)."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A Slurm client command against this cluster; its output."""
        result = subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def job_ids(self) -> list[str]:
        """Every job the controller knows (pending, running, or ended less than MinJobAge ago)."""
        return self.command("squeue", "--noheader", "--states=all", "--format=%i").split()

    def stop(self) -> None:
        """Cancel the jobs still there (their processes are slurmstepd's, not slurmd's), then stop the daemons this
        started, by their pids: slurmd, slurmctld, munged."""
        if self.processes.get("slurmctld") is not None and self.processes["slurmctld"].poll() is None:
            self.command("scancel", f"--partition={PARTITION}", check=False)
            deadline = time.time() + 2 * KILL_WAIT_S + 10
            while time.time() < deadline and self.command("squeue", "--noheader", "--format=%i", check=False).strip():
                time.sleep(0.2)
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def executable(name: str) -> str | None:
    """A Slurm or munge program: on PATH, or in the sbin folders where Debian puts the daemons (not on every PATH)."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_description() -> str:
    """This machine as slurmd sees it: `NodeName=<host> CPUs=... RealMemory=...` (`slurmd -C`)."""
    result = subprocess.run([executable("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    line = next((line for line in result.stdout.splitlines() if line.startswith("NodeName=")), None)
    if result.returncode != 0 or line is None:
        raise ClusterUnavailable(f"slurmd -C could not describe this machine: {result.stderr.strip()}")
    return line


def write_config(folder: Path, node_line: str, socket_path: Path) -> dict[str, str]:
    """slurm.conf for one node (this machine, as `slurmd -C` describes it) and one partition; returns the node's
    fields."""
    fields = dict(item.split("=", 1) for item in node_line.split())
    node, ctld_port, slurmd_port = fields["NodeName"], free_port(), free_port()
    hardware = " ".join(f"{k}={v}" for k, v in fields.items() if k != "NodeName")
    (folder / "slurm.conf").write_text(f"""\
# a single-node cluster for the tests (tests/slurm_cluster.py): this machine, no accounting database
ClusterName=helpers-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "run" / "slurmctld.pid"}
SlurmdPidFile={folder / "run" / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
ReturnToService=2
KillWait={KILL_WAIT_S}
InactiveLimit=0
DefMemPerCPU={int(fields["RealMemory"]) // int(fields["CPUs"])}
NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return fields


def _started(cluster: SlurmCluster, name: str, command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **cluster.env}, start_new_session=True)
    cluster.processes[name] = process
    return process


def _wait_for(what: str, ready, processes: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.time() + timeout
    ended = []
    while time.time() < deadline and not ended:
        if ready():
            return
        ended = [Path(p.args[0]).name for p in processes if p.poll() is not None]
        time.sleep(0.2)
    tails = []
    for log in logs:
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        tails.append(f"{log.name}: {lines[-1] if lines else '(empty)'}")
    why = f"{', '.join(ended)} ended" if ended else f"not in {timeout:.0f} s"
    raise ClusterUnavailable(f"{what} did not come up ({why}; {'; '.join(tails)})")


def start_cluster(folder: str | Path, timeout: float = 60) -> SlurmCluster:
    """munged, slurmctld and slurmd in `folder`, the node idle when this returns. Raises ClusterUnavailable (with
    why) where that cannot be: not root, the packages missing, a daemon that does not start."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if executable(name) is None]
    if missing:
        raise ClusterUnavailable(f"{', '.join(missing)} not found: `make setup` installs Debian's slurm-wlm and munge "
                                 "(as root, where apt-get is)")
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd runs jobs as their users: the test cluster needs root")
    folder = Path(folder).resolve()
    for sub in ("munge", "state", "spool", "run", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    key, socket_path = folder / "munge" / "munge.key", folder / "munge" / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    fields = write_config(folder, node_description(), socket_path)
    cluster = SlurmCluster(folder, fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"]))
    try:
        munged = _started(cluster, "munged", [
            executable("munged"), "--foreground", "--force", f"--socket={socket_path}",
            f"--key-file={key}", f"--pid-file={folder / 'run' / 'munged.pid'}",
            f"--log-file={folder / 'log' / 'munged.log'}", f"--seed-file={folder / 'munge' / 'munged.seed'}"],
            folder / "log" / "munged.out")
        _wait_for("munged", socket_path.exists, [munged], [folder / "log" / "munged.out"], timeout)
        for name in ("slurmctld", "slurmd"):
            _started(cluster, name, [executable(name), "-D", "-f", str(cluster.conf)],
                     folder / "log" / f"{name}.out")

        def idle() -> bool:
            state = cluster.command("sinfo", "--noheader", "--Node", "--format=%T", check=False).strip()
            return state == "idle"

        _wait_for("the node", idle, list(cluster.processes.values()),
                  [folder / "log" / "slurmctld.log", folder / "log" / "slurmd.log"], timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "slurm-cluster")
    cluster = start_cluster(folder)
    print(f"a single-node cluster ({cluster.node}: {cluster.cpus} CPUs, {cluster.memory_mb} MB, partition "
          f"{PARTITION}) in {folder}\n  export SLURM_CONF={cluster.conf}\nCtrl-C (or SIGTERM) stops it", flush=True)

    def stop(signum, frame):
        raise SystemExit(0)

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too where a shell started this in the background
        signal.signal(signum, stop)
    try:
        signal.pause()
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
