"""Sweeps on a real Slurm cluster (the session's single-node cluster: tests/slurm_cluster.py, conftest's
`slurm_cluster`). One sweep through `--executor slurm`, killed outright while its second point's job runs, then
rerun: it reattaches to that job, submits only the point that had none, and a job cancelled with scancel is a failed
point with Slurm's word for it. The same points through submitit's local executor, killed and rerun the same way, are
byte-identical. The jobs' sbatch options are read back from `scontrol show job`, and a job that outlives its time
limit ends as Slurm's TIMEOUT (while it runs, a rerun of its sweep without Slurm is refused). Tiny runs (one tiny
model, 16 images, no analyses); the jobs wait on a FIFO where a job must outlast the test's checks."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers.runs.sweep import Sweep, design_points, make_design
from helpers.runs.sweep.launch import PointJob, SlurmOptions, SubmititLauncher, live_jobs, read_status, run_points

from .conftest import PROJECT_ROOT
from .slurm_cluster import PARTITION

POINT_FILES = ("submission.csv", "test_predictions.csv", "metrics.json", "models/a/test/class_scores.npy",
               "models/a/test/prompt_probs.npy", "models/a/test/image_embeddings.npy")
SLURM_OPTIONS = ("--executor", "slurm", "--partition", PARTITION, "--time", "10", "--cpus-per-job", "1", "--mem-gb",
                 "1", "--sbatch=--comment=sweep-test")


def run_config(path: Path, test_dir: Path, tiny_arch, checkpoint, cache: Path) -> Path:
    """One tiny model on 16 test images, no dev set, no reference: the cheapest full run."""
    raw = {"name": "slurm-test", "data": {"test": str(test_dir), "limit": 16}, "num_workers": 0,
           "cache_dir": str(cache), "models": {"a": {"backend": "open_clip", "arch": str(tiny_arch),
                                                     "pretrained": str(checkpoint), "precision": "fp32",
                                                     "batch_size": 8, "sharpness": 2.3}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def hanging_test_set(folder: Path, scene_dir: Path) -> Path:
    """A test set whose one image is a FIFO that nothing writes: a run that reads it waits (as on a filesystem that
    hangs) until its job is ended."""
    root = folder / "Scene"
    (root / "0").mkdir(parents=True)
    shutil.copy(scene_dir / "classes.json", root / "classes.json")
    os.mkfifo(root / "0" / "0.jpg")
    return root


def statuses(folder: Path) -> dict[str, dict]:
    found = {}
    for path in (folder / "status").glob("*.json") if (folder / "status").is_dir() else []:
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced
            continue
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def running_job(folder: Path, prefix: str):
    """The job id of the point whose id starts with `prefix`, once its job has started its run."""
    def started():
        status = next((s for point, s in statuses(folder).items() if point.startswith(prefix)), {})
        return status.get("job_id") if status.get("status") == "running" and status.get("run_pid") else None
    return started


def sweep(design: Path, folder: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "helpers", "sweep", str(design), "--output-dir", str(folder), "--no-analyses",
            "--quiet", *options]


def killed_while_running(command: list[str], folder: Path, prefix: str) -> dict[str, dict]:
    """Start a sweep, SIGKILL it once the point `prefix...` runs as a job; the points' statuses then."""
    driver = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(running_job(folder, prefix), 240, f"point {prefix} to run")
    except AssertionError:
        driver.kill()
        raise AssertionError(f"{driver.communicate()[1]}") from None
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    return statuses(folder)


def slurm_jobs(cluster) -> dict[str, dict[str, str]]:
    """Every job the controller knows, as `scontrol show job` describes it (key -> value)."""
    jobs = {}
    for block in cluster.command("scontrol", "--oneliner", "show", "job").splitlines():
        fields = dict(item.split("=", 1) for item in block.split() if "=" in item)
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def time_limited_job(tmp: Path, config: Path) -> dict:
    """A sweep of one point whose run waits on a FIFO, its job's time limit 1 minute, run in this process through the
    sweep's launcher. While the job runs: whether it is a live job to reattach to, and a rerun of the sweep without
    Slurm (refused). Then its final status, and whether it is still live."""
    design = make_design(config, [], [], False)
    sweep_run = Sweep(design, design_points(design), tmp / "out")
    sweep_run.claim()
    job = sweep_run.job(sweep_run.points[0], analyses=False, executor="slurm")
    launcher = SubmititLauncher("slurm", sweep_run.folder / "submitit", SlurmOptions(
        partition=PARTITION, time_min=1, cpus_per_job=1, mem_gb=0.5), None)
    found = {"point": job.point}

    def watch():
        wait_for(lambda: read_status(job.status_file).get("run_pid"), 120, "the time-limited job to run")
        found["live_while_running"] = live_jobs([job], sweep_run.folder / "submitit")
        found["elsewhere"] = subprocess.run(sweep(config, sweep_run.folder, "--executor", "submitit-local"),
                                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    watcher = threading.Thread(target=watch)
    watcher.start()
    found["status"] = run_points([job], {}, launcher, set(), False)[job.point]
    watcher.join()
    found["live_after"] = live_jobs([job], sweep_run.folder / "submitit")
    return found


def local_sweep(tmp: Path, scene_dir, tiny_arch, checkpoint) -> dict:
    """The base and the scoring point through submitit's local executor, killed while the base runs, rerun."""
    config = run_config(tmp / "base.yaml", scene_dir, tiny_arch, checkpoint, tmp / "cache")
    design = tmp / "sweep.yaml"
    design.write_text(yaml.safe_dump({"config": str(config), "points": [{"scoring": "mean_logit"}]}))
    folder, local = tmp / "out", ("--executor", "submitit-local")
    killed = killed_while_running(sweep(design, folder, *local, "--jobs", "1"), folder, "base-")
    jobs = [PointJob(point, "", "", str(folder / "status" / f"{point}.json"), "", "", "") for point in killed]
    live = live_jobs(jobs, folder / "submitit")
    rerun = subprocess.run(sweep(design, folder, *local, "--jobs", "2"), cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=300)
    return {"local_killed": killed, "local_live": live, "local_rerun": rerun, "local": folder,
            "local_statuses": statuses(folder)}


@pytest.fixture(scope="module")
def on_slurm(slurm_cluster, tmp_path_factory, scene_dir, tiny_arch, tiny_checkpoints):
    """Three things at once (most of the time is spent waiting on jobs): a job past its time limit, the sweep on
    Slurm, the same points through submitit's local executor."""
    tmp = tmp_path_factory.mktemp("on-slurm")
    hanging = hanging_test_set(tmp / "hanging", scene_dir)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        timed = pool.submit(time_limited_job, tmp / "time-limit", run_config(
            tmp / "time-limit" / "config.yaml", hanging, tiny_arch, tiny_checkpoints[0], tmp / "time-limit-cache"))
        local = pool.submit(local_sweep, tmp / "local", scene_dir, tiny_arch, tiny_checkpoints[0])

        # on Slurm: the base, a point that changes the scoring only, and one whose run hangs (it will be cancelled)
        config = run_config(tmp / "slurm" / "base.yaml", scene_dir, tiny_arch, tiny_checkpoints[0],
                            tmp / "slurm-cache")
        design = tmp / "slurm" / "sweep.yaml"
        design.write_text(yaml.safe_dump({"config": str(config), "points": [{"scoring": "mean_logit"},
                                                                            {"data.test": str(hanging)}]}))
        folder = tmp / "slurm" / "out"
        found = {"killed": killed_while_running(sweep(design, folder, *SLURM_OPTIONS, "--jobs", "1"), folder,
                                                "scoring="),
                 "jobs_before": slurm_jobs(slurm_cluster)}
        # the scoring point's job is held until the rerun has read the statuses and submitted the hanging point: the
        # rerun must find it running, however soon its tiny run would otherwise end
        held = found["killed"][point_named(found["killed"], "scoring=")]["job_id"]
        slurm_cluster.command("scontrol", "suspend", held)
        rerun = subprocess.Popen(sweep(design, folder, *SLURM_OPTIONS, "--jobs", "2"), cwd=PROJECT_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        found["cancelled"] = wait_for(running_job(folder, "test="), 240, "the hanging point to run")
        slurm_cluster.command("scontrol", "resume", held)
        slurm_cluster.command("scancel", found["cancelled"])
        out, err = rerun.communicate(timeout=300)
        found.update(rerun=subprocess.CompletedProcess(rerun.args, rerun.returncode, out, err),
                     jobs_after={**found["jobs_before"], **slurm_jobs(slurm_cluster)}, slurm=folder,
                     statuses=statuses(folder), time_limited=timed.result(), **local.result())
    return found


def point_named(statuses: dict, prefix: str) -> str:
    return next(point for point in statuses if point.startswith(prefix))


def test_a_rerun_reattaches_to_the_live_job_and_submits_only_the_point_without_one(on_slurm):
    killed, after = on_slurm["killed"], on_slurm["statuses"]
    base, scoring = point_named(killed, "base-"), point_named(killed, "scoring=")
    assert killed[base]["status"] == "done" and killed[scoring]["status"] == "running"
    assert point_named(after, "test=") not in killed  # not submitted yet when the sweep was killed (--jobs 1)
    time_limited = on_slurm["time_limited"]["status"]["job_id"]
    before = set(on_slurm["jobs_before"]) - {time_limited}
    assert before == {killed[base]["job_id"], killed[scoring]["job_id"]}
    # the rerun submitted one job (the hanging point's), and waited for the running one
    assert set(on_slurm["jobs_after"]) - before - {time_limited} == {on_slurm["cancelled"]}
    assert after[scoring]["status"] == "done" and after[scoring]["job_id"] == killed[scoring]["job_id"]
    assert after[base] == killed[base]  # finished before: collected, not run again
    assert "3 points (1 finished before, 1 running as jobs of an earlier sweep, reattached; 1 to run), as slurm " \
           "jobs" in on_slurm["rerun"].stderr


def test_a_job_that_slurm_ends_is_a_failed_point_with_slurms_reason(on_slurm):
    result = on_slurm["rerun"]
    assert result.returncode == 4, result.stderr
    cancelled = on_slurm["statuses"][point_named(on_slurm["statuses"], "test=")]
    assert cancelled["status"] == "failed" and cancelled["slurm_state"] == "CANCELLED"
    assert cancelled["error"] == f"Slurm ended job {on_slurm['cancelled']}: CANCELLED"
    assert f"failed: Slurm ended job {on_slurm['cancelled']}: CANCELLED" in result.stderr
    timed = on_slurm["time_limited"]["status"]
    assert timed["status"] == "failed" and timed["slurm_state"] == "TIMEOUT"
    assert timed["error"] == f"Slurm ended job {timed['job_id']}: TIMEOUT (TimeLimit)"
    # while it ran it was a live job, to reattach to (a rerun without Slurm was refused); once ended, not
    point = on_slurm["time_limited"]["point"]
    assert on_slurm["time_limited"]["live_while_running"] == {point: ("slurm", timed["job_id"])}
    refused = on_slurm["time_limited"]["elsewhere"]
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: 1 point(s) still run as slurm jobs of an earlier sweep ({point}: job {timed['job_id']}): rerun with "
        "--executor slurm to wait for them, or end them first (scancel JOB_ID)")
    assert on_slurm["time_limited"]["live_after"] == {}


def test_job_states_come_from_slurm_without_warnings(on_slurm):
    for output in (on_slurm["rerun"].stderr, on_slurm["local_rerun"].stderr):
        assert "sacct" not in output and "warning" not in output.lower(), output


def test_the_jobs_are_what_the_options_asked_for(on_slurm):
    jobs, statuses = on_slurm["jobs_after"], on_slurm["statuses"]
    for point, status in statuses.items():
        job = jobs[status["job_id"]]
        assert job["JobName"] == point  # a job is named after its point (squeue shows which is which)
        assert job["Partition"] == PARTITION and job["TimeLimit"] == "00:10:00"
        assert job["NumCPUs"] == "1" and job["MinMemoryNode"] == "1G" and job["Comment"] == "sweep-test"
        assert Path(job["WorkDir"]) == PROJECT_ROOT


def test_a_slurm_sweep_and_a_local_one_write_the_same_points_byte_for_byte(on_slurm):
    slurm, local = on_slurm["statuses"], on_slurm["local_statuses"]
    assert on_slurm["local_rerun"].returncode == 0, on_slurm["local_rerun"].stderr
    for prefix in ("base-", "scoring="):
        ours, theirs = point_named(slurm, prefix), point_named(local, prefix)
        assert slurm[ours]["status"] == local[theirs]["status"] == "done"
        for name in POINT_FILES:
            assert (on_slurm["slurm"] / "points" / ours / name).read_bytes() == \
                   (on_slurm["local"] / "points" / theirs / name).read_bytes(), (prefix, name)


def test_a_local_rerun_reattaches_to_the_live_local_job(on_slurm):
    killed, after = on_slurm["local_killed"], on_slurm["local_statuses"]
    base = point_named(killed, "base-")
    assert killed[base]["status"] == "running" and after[base]["status"] == "done"
    assert after[base]["job_id"] == killed[base]["job_id"]  # the same job, not another
    assert on_slurm["local_live"] == {base: ("submitit-local", killed[base]["job_id"])}
    assert "2 points (0 finished before, 1 running as jobs of an earlier sweep, reattached; 1 to run), as " \
           "submitit-local jobs" in on_slurm["local_rerun"].stderr
    jobs = {p.name.split("_")[0] for p in (on_slurm["local"] / "submitit").glob("*_submitted.pkl")}
    assert jobs == {s["job_id"] for s in after.values()} and len(jobs) == 2  # one job per point
