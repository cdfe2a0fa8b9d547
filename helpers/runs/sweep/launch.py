"""Running a sweep's points: each a `python -m helpers run` of its config into its own run folder, several at once
on this machine (`LocalLauncher`: N at a time, or one per GPU) or as Slurm jobs through submitit (`SubmititLauncher`;
its local executor runs the same path on one machine; `scheduler` is what the jobs' scheduler says of them).

A point's job writes its own status (`status/<point>.json`: running, then done or failed with the error), its log
(`logs/<point>.log`) and the number of images it encoded (the encode ledger, `helpers.infra.ledger`), so that whoever
reruns the sweep, on whichever machine, knows which points finished: a rerun skips them and redoes the rest. The points
wait for the runs that encode what they need: first the base (which also encodes the analyses' images), then, per
model, the first point with the same images and preprocessing, so that no two points encode the same images; and for
the first point that computes an analysis notebook they share (`helpers.runs.analyses`), which they then copy.

A point's job records its id in the point's status as it is submitted (and again when it starts): a sweep that was
stopped while its jobs ran finds them on rerun, reattaches to those still queued or running, and submits only the
points that have no live job.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from ...infra.env import env_flag
from ...infra.errors import one_line
from ...infra.files import atomic_write_text, read_json_or_none
from ...infra.ledger import ENCODE_LEDGER_ENV, images_encoded
from .design import Point, SweepError

EXECUTORS = ("local", "slurm", "submitit-local")
EXIT_WITH_PARENT_ENV = "HELPERS_EXIT_WITH_PARENT"  # a point's run ends when the process that started it ends
_RUNNING: dict[str, subprocess.Popen] = {}  # this process's points' runs, by point


@dataclass
class PointJob:
    """What a point's job needs (plain data: submitit pickles it for the job)."""

    point: str
    config_file: str
    run_dir: str
    status_file: str
    log_file: str
    ledger_file: str
    cwd: str
    analyses: bool = True
    analyses_store: str | None = None  # the analyses shared by the sweep's points (`helpers.runs.analyses`)
    env: dict[str, str] = field(default_factory=dict)
    executor: str = "local"  # what runs it: one of EXECUTORS


def read_status(path: str | Path) -> dict:
    return read_json_or_none(path, dict) or {}


def _write_status(job: PointJob, status: dict) -> dict:
    atomic_write_text(Path(job.status_file), json.dumps(status, indent=2) + "\n")
    return status


def finished(job: PointJob) -> bool:
    """Done, and its outputs still there (a point whose folder was emptied since runs again)."""
    run_dir = Path(job.run_dir)
    return (read_status(job.status_file).get("status") == "done" and (run_dir / "submission.csv").is_file()
            and (run_dir / "metrics.json").is_file())


def failure_of(log: Path, returncode: int) -> str:
    """What the run said when it failed: its `error:` line (the notebook and the cell), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    last = lines[-1] if lines else "no output"
    return f"exit status {returncode}: {last}"


JOB_ID_ENV = {"slurm": "SLURM_JOB_ID", "submitit-local": "SUBMITIT_LOCAL_JOB_ID"}  # in a job: its id


def run_point(job: PointJob) -> dict:
    """Run one point (`python -m helpers run` of its config into its folder), writing its status as it goes; returns
    the final status."""
    started = time.time()
    job_id = os.environ.get(JOB_ID_ENV[job.executor]) if job.executor in JOB_ID_ENV else None
    status = {"point": job.point, "status": "running", "started": datetime.now(UTC).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "pid": os.getpid(), "run_dir": job.run_dir, "log": job.log_file,
              "gpu": job.env.get("CUDA_VISIBLE_DEVICES"), "executor": job.executor, "job_id": job_id}
    if job.executor == "slurm":
        run_to_the_time_limit()
    _write_status(job, status)
    ledger = Path(job.ledger_file)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text("")  # this attempt's encodes only
    command = [sys.executable, "-m", "helpers", "run", job.config_file, "--output-dir", job.run_dir, "--quiet"]
    if not job.analyses:
        command.append("--no-analyses")
    elif job.analyses_store is not None:
        command += ["--shared-analyses", job.analyses_store]
    env = {**os.environ, **job.env, ENCODE_LEDGER_ENV: str(ledger), EXIT_WITH_PARENT_ENV: "1"}
    Path(job.log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log_file, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=job.cwd, env=env)
        _RUNNING[job.point] = process
        _write_status(job, {**status, "run_pid": process.pid})
        try:
            returncode = process.wait()
        finally:
            _RUNNING.pop(job.point, None)
    done = returncode == 0 and (Path(job.run_dir) / "submission.csv").is_file()
    status.update(status="done" if done else "failed", returncode=returncode, seconds=round(time.time() - started, 1),
                  images_encoded=images_encoded(ledger), error=None if done else failure_of(Path(job.log_file),
                                                                                              returncode))
    return _write_status(job, status)


def run_to_the_time_limit() -> None:
    """In a Slurm job: the run goes on until Slurm ends it at its time limit (its state then TIMEOUT, which the sweep
    reports). submitit asks Slurm to signal (USR2) every process of the job 90 s before the limit: its own handler
    would end the job with an error of its own (the job merely FAILED) unless the function can be checkpointed, and
    the signal would kill the point's run and its kernels outright. A point's run cannot be checkpointed part-way
    (a rerun of the sweep resumes it from what it finished), so this process and the run it starts (which inherits
    the disposition) ignore the signal."""
    import signal

    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def exit_with_parent() -> None:
    """In a point's run (EXIT_WITH_PARENT_ENV set, on Linux): end when the sweep (or job) that started it ends, even
    when that one is killed outright, so that a rerun never races a run left behind."""
    if not env_flag(EXIT_WITH_PARENT_ENV) or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent ended before the call
        sys.exit(143)


# --- launchers: start a job, say when it is done


class LocalLauncher:
    """N points at a time on this machine; with GPUs, one point per GPU, each run seeing only its own."""

    def __init__(self, jobs: int, gpus: list[str] | None = None):
        self.gpus = list(gpus or [])
        self.slots = len(self.gpus) if self.gpus else jobs
        self.free_gpus = list(self.gpus)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.slots)
        self.gpu_of: dict[str, str] = {}
        # on the CPU, the cores are shared out: N runs with every core each would only slow each other down
        self.threads = None if self.gpus or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // jobs)

    def describe(self) -> str:
        return f"on GPUs {', '.join(self.gpus)}, one point each" if self.gpus else f"{self.slots} at a time"

    def start(self, job: PointJob):
        if self.gpus:
            gpu = self.free_gpus.pop(0)
            self.gpu_of[job.point] = gpu
            job.env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.threads is not None and self.slots > 1:
            job.env["OMP_NUM_THREADS"] = str(self.threads)
        return self.pool.submit(run_point, job)

    def result(self, job: PointJob, handle) -> dict:
        if job.point in self.gpu_of:
            self.free_gpus.append(self.gpu_of.pop(job.point))
        try:
            return handle.result()
        except Exception as e:  # the job could not even start its run (e.g. its log could not be written)
            status = {**read_status(job.status_file), "point": job.point, "status": "failed",
                      "error": f"the point could not run: {one_line(e)}"}
            try:
                return _write_status(job, status)
            except OSError:
                return status

    def close(self, interrupted: bool = False) -> None:
        if interrupted:  # the runs end now; what they finished stays, and a rerun redoes them
            for process in list(_RUNNING.values()):
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    sbatch: list[str] = field(default_factory=list)  # extra sbatch flags, e.g. --account=lab --qos=high


def sbatch_parameters(flags: list[str]) -> dict[str, str | bool]:
    """`--key=value` / `--flag` sbatch options as submitit's slurm_additional_parameters ({key: value})."""
    params: dict[str, str | bool] = {}
    for flag in flags:
        for item in flag.split():
            if not item.startswith("--") or len(item) < 3:
                raise SweepError(f"--sbatch {flag}: expected sbatch's long options, e.g. --account=lab --qos=high")
            key, sep, value = item[2:].partition("=")
            params[key.replace("-", "_")] = value if sep else True
    return params


class SubmititLauncher:
    """Each point a job of submitit's executor: Slurm (`slurm`), or its local executor (`submitit-local`: the same
    path, on this machine). The jobs write their statuses; this process only submits and waits, and the jobs go on
    when it ends. A Slurm job is named after its point; Slurm says when it ended, and why when Slurm ended it."""

    def __init__(self, kind: str, folder: Path, options: SlurmOptions, jobs: int | None):
        import submitit

        from .scheduler import SqueueSlurmExecutor

        self.kind, self.slots = kind, jobs or 1 << 30
        if kind == "slurm":
            self.executor = SqueueSlurmExecutor(folder)
            params = {"time": options.time_min, "partition": options.partition, "gpus_per_node": options.gpus_per_job,
                      "cpus_per_task": options.cpus_per_job, "additional_parameters": sbatch_parameters(options.sbatch)
                      or None, "mem": None if options.mem_gb is None else f"{round(options.mem_gb * 1024)}M"}
        else:
            self.executor = submitit.LocalExecutor(folder)
            params = {"timeout_min": options.time_min, "gpus_per_node": options.gpus_per_job}
        self.executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    def describe(self) -> str:
        return f"as {self.kind} jobs (submitit, logs in {self.executor.folder})"

    def start(self, job: PointJob):
        if self.kind == "slurm":
            self.executor.update_parameters(job_name=job.point)
        submitted = self.executor.submit(run_point, job)
        status = read_status(job.status_file)
        # the job may already have started and written its own; a `running` of an earlier job (one that Slurm ended
        # before it could write its end) is replaced, else a rerun could not find this job and would submit it again
        if status.get("status") != "running" or str(status.get("job_id")) != str(submitted.job_id):
            _write_status(job, {"point": job.point, "status": "submitted", "executor": self.kind,
                                "job_id": submitted.job_id})
        return submitted

    def attach(self, live: dict[str, str]) -> dict[str, object]:
        """Handles of the live jobs (point -> job id) that an earlier sweep started, to wait for as for its own."""
        from .scheduler import ReattachedLocalJob, SqueueSlurmJob

        handle_class = SqueueSlurmJob if self.kind == "slurm" else ReattachedLocalJob
        return {point: handle_class(folder=self.executor.folder, job_id=job_id) for point, job_id in live.items()}

    def result(self, job: PointJob, handle) -> dict:
        """The point's final status: what its job returned, else why the job has no result; where Slurm ended the
        job (scancel, its time limit, ...) and the point did not finish, Slurm's state and reason."""
        from .scheduler import job_result

        returned, value = job_result(handle)
        own = read_status(job.status_file)
        if returned and isinstance(value, dict):
            status = value
        elif own.get("status") == "done" and str(own.get("job_id")) == str(handle.job_id):
            status = own  # the run finished and said so; its result file is not seen here yet (a shared filesystem)
        else:
            status = {**own, "point": job.point, "status": "failed",
                      "executor": self.kind, "job_id": handle.job_id, "error": self._failure(handle, value)}
        # also where the job returned a status: the run it watched may have ended because Slurm ended the job
        if status.get("status") != "done" and self.kind == "slurm":
            state = self._final_state(handle)
            ended = state.ended_by_slurm()
            status["slurm_state"] = state.state
            if ended:
                status["error"] = f"Slurm ended job {handle.job_id}: {ended}"
        return _write_status(job, status)

    def _failure(self, handle, value) -> str:
        """Why a job returned no status: its function's error (the traceback's last line), or the end of its log."""
        if isinstance(value, str) and value.strip():
            return f"job {handle.job_id} failed: {value.strip().splitlines()[-1]}"
        for path in (handle.paths.stderr, handle.paths.stdout):
            try:
                lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
            except OSError:
                continue
            if lines:
                return f"job {handle.job_id} ended without a result; its log {path}: {lines[-1]}"
        return f"job {handle.job_id} ended without a result (and no log)"

    @staticmethod
    def _final_state(handle, timeout_s: float = 120):
        """The job's state once Slurm says it has ended (a job that returned its result may still be on its way
        out); after `timeout_s`, the last state seen."""
        deadline = time.time() + timeout_s
        state = handle.watcher.job_state(handle.job_id, mode="force")
        while state.live and time.time() < deadline:
            time.sleep(1)
            state = handle.watcher.job_state(handle.job_id, mode="force")
        return state

    def close(self, interrupted: bool = False) -> None:
        """The jobs go on when this process ends (a rerun of the sweep gathers them)."""


def live_jobs(jobs: list[PointJob], submitit_folder: Path) -> dict[str, tuple[str, str]]:
    """The points whose job, started by an earlier sweep (its id in the point's status), is still queued or running:
    point -> (executor, job id). A Slurm job is asked of squeue (none runs from here where there is no squeue), a
    local job of its submitit controller. Raises SweepError where squeue is here but cannot answer."""
    import shutil

    from .scheduler import SlurmUnavailable, controller_alive, squeue_states

    recorded = {}
    for job in jobs:
        status = read_status(job.status_file)
        if status.get("status") in ("submitted", "running") and status.get("executor") in JOB_ID_ENV \
                and status.get("job_id"):
            recorded[job.point] = (status["executor"], str(status["job_id"]))
    slurm_ids = [job_id for executor, job_id in recorded.values() if executor == "slurm"]
    states = {}
    if slurm_ids and shutil.which("squeue") is not None:  # without Slurm here, none of its jobs runs from here
        try:
            states = squeue_states(slurm_ids)
        except SlurmUnavailable as e:
            jobs_text = ", ".join(f"{point}: job {job_id}" for point, (_, job_id) in recorded.items())
            raise SweepError(f"an earlier sweep left jobs ({jobs_text}) and Slurm cannot say whether they still run "
                             f"({e}): rerun once squeue answers, so that no point runs twice") from None

    def live(executor: str, job_id: str) -> bool:
        if executor == "slurm":
            return job_id in states and states[job_id].live
        return controller_alive(job_id, submitit_folder)

    return {point: job for point, job in recorded.items() if live(*job)}


# --- the schedule


def image_needs(point: Point) -> set[str]:
    """What a point's inference encodes: per model and view, the embedding cache's own key
    (`helpers.infra.cache.image_store`: the model's identity and the preprocessing) with the images, as digests.
    The models are described by their entries as written (`precision: auto` unresolved): the sweep may run where
    the points' GPUs are not, and only which points share an entry matters here. The backends' descriptions need no
    torch (the sweep's own process imports it only for a weights check not yet kept)."""
    from ...config import json_digest
    from ...models.backends import BACKENDS

    data = point.config.data
    images = {"test": data.test, "limit": data.limit, "dev": None if data.dev is None else
              {"path": data.dev.path, "limit": data.dev.limit}}
    needs = set()
    for name, entry in point.config.models.items():
        backend = BACKENDS[entry.backend](name, entry)
        needs |= {json_digest({"model": backend.identity(), "preprocess": view.key(), "images": images})
                  for view in backend.views()}
    return needs


def analysis_needs(point: Point) -> set[str]:
    """The analyses a point's run computes or copies: what each of its analysis notebooks reads of the config (the
    images are the same for every point that reads the same data settings)."""
    from ...config import json_digest
    from ..analyses import analysis_notebooks, reads

    return {json_digest(reads(point.config, analysis)) for analysis in analysis_notebooks(point.config)}


def dependencies(points: list[Point], analyses: bool = False) -> dict[str, set[str]]:
    """Each point waits for the base and for the first point that encodes what it needs, and with `analyses`, for
    the first point that computes an analysis it has too (which it then copies)."""
    def needs_of(point: Point) -> set[str]:
        return image_needs(point) | (analysis_needs(point) if analyses else set())

    base = points[0].id
    first_with = dict.fromkeys(needs_of(points[0]), base)
    waits: dict[str, set[str]] = {base: set()}
    for point in points[1:]:
        needs = needs_of(point)
        waits[point.id] = {base} | {first_with[n] for n in needs if n in first_with}
        for need in needs:
            first_with.setdefault(need, point.id)
    return waits


def run_points(jobs: list[PointJob], waits: dict[str, set[str]], launcher, done_before: set[str],
               progress: bool, attached: dict | None = None) -> dict:
    """Start the jobs whose waits are over (the points they wait for ended now or `done_before`), as many at once as
    the launcher takes, until all have ended; returns their final statuses by point. `attached`: point -> the handle
    of its job still running from an earlier sweep, waited for as if started here."""
    attached = attached or {}
    running = {job.point: (job, attached[job.point]) for job in jobs if job.point in attached}
    pending, results = [job for job in jobs if job.point not in attached], {}
    bar = tqdm(total=len(jobs) + len(done_before), initial=len(done_before), unit="point", desc="sweep",
               disable=not progress, dynamic_ncols=True)
    try:
        while pending or running:
            for job in list(pending):
                if len(running) < launcher.slots and waits.get(job.point, set()) <= done_before | set(results):
                    running[job.point] = (job, launcher.start(job))
                    pending.remove(job)
            ended = [p for p, (_, handle) in running.items() if handle.done()]
            for point in ended:
                job, handle = running.pop(point)
                results[point] = launcher.result(job, handle)
                bar.update(1)
            failed = sum(r.get("status") != "done" for r in results.values())
            bar.set_postfix_str(f"running {', '.join(running) or '-'}" + (f"; failed {failed}" if failed else ""),
                                refresh=bool(ended))
            if not ended:
                time.sleep(0.2)
    except BaseException:
        bar.close()
        launcher.close(interrupted=True)
        raise
    bar.close()
    launcher.close()
    return results

