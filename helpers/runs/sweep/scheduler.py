"""The jobs of a sweep run through submitit, as their scheduler sees them: which are still queued or running (a rerun
reattaches to those instead of submitting their points again), and why one ended without its point's result.

Slurm: the states come from `squeue --states=all`, the controller's own record of its jobs (queued, running, and
those that ended in the last MinJobAge seconds, 300 by default), which every cluster answers. submitit asks `sacct`,
which needs Slurm's accounting database: where there is none, every call fails with a warning and submitit never
learns that a job was cancelled or ran out of time (it waits for a result that never comes). `SqueueSlurmExecutor`
is submitit's Slurm executor with its jobs watched through squeue instead.

submitit's local executor (`submitit-local`): a job is its controller process (the job id is its pid), which outlives
the sweep that started it; it is live while that process is.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core import utils as submitit_utils
from submitit.local.local import LocalJob
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

# Slurm's job states (squeue's %T) of a job that is still queued, running or on its way out: anything else has ended
LIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"})
# ended by Slurm itself (or an admin, or `scancel`), not by the job's own program
ENDED_BY_SLURM = frozenset({
    "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED"})
NOT_LISTED = "NOT_LISTED"  # squeue no longer lists the job: it ended more than MinJobAge seconds ago
SQUEUE_INTERVAL_S = 15  # at most this long between two squeue calls while jobs run (one call for all of them)


class SlurmUnavailable(RuntimeError):
    """squeue did not answer (the controller down or unreachable): the message is squeue's."""


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # Slurm's (squeue %T), or NOT_LISTED
    reason: str = ""  # Slurm's reason (squeue %r): TimeLimit, NonZeroExitCode, Resources, ...
    nodes: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def ended_by_slurm(self) -> str | None:
        """Why Slurm ended the job, in its words (`CANCELLED`, `TIMEOUT (TimeLimit)`, ...); None if it did not."""
        if self.state not in ENDED_BY_SLURM:
            return None
        return self.state + (f" ({self.reason})" if self.reason not in ("", "None") else "")


def squeue_states(job_ids: list[str]) -> dict[str, JobState]:
    """Each job's state from squeue; a job it no longer lists is NOT_LISTED. Raises SlurmUnavailable when squeue
    fails otherwise."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    command = ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r|%N", f"--jobs={','.join(ids)}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmUnavailable(f"{' '.join(command[:1])}: {e}") from None
    # one id that squeue no longer knows is an error ("Invalid job id specified"); among several it is left out
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise SlurmUnavailable(f"squeue: {result.stderr.strip() or f'exit status {result.returncode}'}")
    states = {job_id: JobState(job_id, NOT_LISTED) for job_id in ids}
    for line in result.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4 and fields[0] in states:
            states[fields[0]] = JobState(*fields)
    return states


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's watcher of Slurm jobs (one call for every job of the process, at growing intervals), asking squeue
    instead of sacct."""

    def update(self) -> None:
        ids = sorted({job_id.split("_")[0] for job_id in self._registered - self._finished})
        if not ids:
            return
        self._num_calls += 1
        try:
            states = squeue_states(ids)
        except SlurmUnavailable as e:  # the states stay as they were (the jobs live); the next call tries again
            log.warning("could not read the jobs' states (%s): trying again in %d s", e, SQUEUE_INTERVAL_S)
        else:
            self._info_dict.update({job_id: {"State": s.state, "Reason": s.reason, "NodeList": s.nodes}
                                    for job_id, s in states.items()})
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        state = self.get_state(job_id, mode=mode)
        return state != "UNKNOWN" and state not in LIVE_STATES  # UNKNOWN: not asked yet

    def job_state(self, job_id: str, mode: str = "standard") -> JobState:
        info = self.get_info(job_id, mode=mode)
        return JobState(job_id, info.get("State", "UNKNOWN"), info.get("Reason", ""), info.get("NodeList", ""))


class SqueueSlurmJob(SlurmJob):
    watcher = SqueueWatcher(delay_s=SQUEUE_INTERVAL_S)


class SqueueSlurmExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor, its jobs watched through squeue."""

    job_class = SqueueSlurmJob


# --- submitit's local executor: a job is a controller process on this machine


def controller_alive(job_id: str, folder: Path) -> bool:
    """Whether the local job `job_id` (its controller's pid) is still running: that process, running submitit's
    local controller for `folder` (not another process that took the pid since), and not a zombie."""
    proc = Path("/proc") / str(job_id)
    try:
        command = (proc / "cmdline").read_bytes().split(b"\0")
        status = (proc / "status").read_text()
    except (OSError, ValueError):
        return False
    zombie = any(line.startswith("State:") and "Z" in line.split()[1:2] for line in status.splitlines())
    return (not zombie and b"submitit.local._local" in command
            and any(Path(os.fsdecode(arg)) == Path(folder).absolute() for arg in command if arg))


class ReattachedLocalJob(LocalJob):
    """A job of submitit's local executor started by an earlier sweep (its controller is not this process's child):
    done when its result is there or its controller has ended."""

    def done(self, force_check: bool = False) -> bool:
        return self.paths.result_pickle.exists() or not controller_alive(self.job_id, self.paths.folder)


def job_result(handle) -> tuple[bool, object]:
    """(True, what the job's function returned) or (False, why it has no result: its error, or that it wrote none),
    without waiting: call once the job is done."""
    if not handle.paths.result_pickle.exists():
        return False, None
    outcome, value = submitit_utils.pickle_load(handle.paths.result_pickle)
    return outcome == "success", value
