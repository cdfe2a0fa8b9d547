"""Sweeps (`python -m helpers sweep`): the design (grid product, --zip, sweep files, the checks before anything runs),
the schedule (N at a time, one point per GPU, points waiting for whoever encodes their images), and a real sweep of
papermill runs on a tiny model: killed outright, then rerun two at a time through submitit's local executor, each
point's submission byte-identical to the point run alone, a failing point named with its notebook and cell, and the
report's numbers against the points' own metrics.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from helpers.__main__ import main
from helpers.infra.ledger import images_encoded
from helpers.runs.compare import compare_runs
from helpers.runs.sweep import design_points, make_design
from helpers.runs.sweep.design import SweepError, parse_grid, point_id
from helpers.runs.sweep.launch import dependencies, failure_of, sbatch_parameters

from .conftest import INTEL_CLASS_MAP, PROJECT_ROOT


def base_config(folder: Path, scene_dir, dev_dir, tiny_arch, checkpoint, cache: Path, **models) -> Path:
    """One tiny model (a), or the models given, the dev set, the winner's reference: what the sweeps run on."""
    entry = {"backend": "open_clip", "arch": str(tiny_arch), "precision": "fp32", "batch_size": 8}
    raw = {"name": "sweep-test", "data": {"test": str(scene_dir),
                                          "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}},
           "models": models or {"a": {**entry, "pretrained": str(checkpoint), "sharpness": 2.3}},
           "cache_dir": str(cache), "num_workers": 0, "reference": "winner-116"}
    path = folder / "base.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def two_models(tmp_path, scene_dir, dev_dir, tiny_arch, tiny_checkpoints) -> Path:
    entry = {"backend": "open_clip", "arch": str(tiny_arch), "precision": "fp32"}
    raw = yaml.safe_load(base_config(tmp_path, scene_dir, dev_dir, tiny_arch, None, tmp_path / "cache",
                                     a={**entry, "pretrained": str(tiny_checkpoints[0]), "sharpness": 2.3},
                                     b={**entry, "pretrained": str(tiny_checkpoints[1]), "sharpness": 2.0}).read_text())
    raw["ensemble"] = {"weights": {"a": 0.6, "b": 0.4}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "base.yaml"


# --- the design


def test_grid_values_are_read_as_a_yaml_list():
    assert parse_grid("models.a.sharpness=2.0,2.3") == ("models.a.sharpness", [2.0, 2.3])
    assert parse_grid("prompts=winner,{set: winner, exclude: [descriptions]}") == (
        "prompts", ["winner", {"set": "winner", "exclude": ["descriptions"]}])
    assert parse_grid("models=[a],[a, b]") == ("models", [["a"], ["a", "b"]])


def test_the_grid_is_the_product_and_zip_pairs(two_models):
    points = design_points(make_design(two_models, [], ["models.a.sharpness=1.0,2.3", "scoring=mean_logit,prototype"],
                                       False))
    assert [p.settings for p in points][0] == {}  # the base first
    # 2 x 2, one of which (sharpness 2.3, the base's) differs from the base by its scoring only
    assert [(p.config.models["a"].sharpness, p.config.scoring) for p in points[1:]] == [
        (1.0, "mean_logit"), (1.0, "prototype"), (2.3, "mean_logit"), (2.3, "prototype")]
    zipped = design_points(make_design(two_models, [], ["models.a.sharpness=1.0,2.3", "scoring=mean_logit,prototype"],
                                       True))
    assert [(p.config.models["a"].sharpness, p.config.scoring) for p in zipped[1:]] == [
        (1.0, "mean_logit"), (2.3, "prototype")]
    # a point equal to the base is the base
    same = design_points(make_design(two_models, [], ["models.a.sharpness=2.3,1.0"], False))
    assert len(same) == 2 and same[0].id.startswith("base-")


def test_a_grid_over_the_transductive_method_has_a_point_per_method(two_models):
    from helpers.research.transductive import METHODS

    grid = [f"transductive.method={','.join(METHODS.names())}", "transductive.applies_to=ensemble,each_model"]
    points = design_points(make_design(two_models, [], grid, False))
    assert points[0].config.transductive is None  # the base: zero-shot
    assert [(p.config.transductive.method, p.config.transductive.applies_to) for p in points[1:]] == [
        (m, scope) for m in METHODS.names() for scope in ("ensemble", "each_model")]
    assert points[1].id.startswith("method=em_prior_applies_to=ensemble-")


def test_a_sweep_file_holds_grid_zip_and_points(two_models, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "config": str(two_models), "set": ["data.limit=8"],
        "grid": {"models.b.sharpness": [1.0, 3.0]},
        "zip": {"ensemble.weights.a": [0.3, 0.7], "ensemble.weights.b": [0.7, 0.3]},
        "points": [{"models": ["a"]}]}))
    points = design_points(make_design(sweep, [], [], False))
    assert all(p.config.data.limit == 8 for p in points)
    grid = [(p.config.models["b"].sharpness, p.config.ensemble.weights["a"]) for p in points[1:5]]
    assert grid == [(1.0, 0.3), (1.0, 0.7), (3.0, 0.3), (3.0, 0.7)]
    only_a = points[5].config
    assert list(only_a.models) == ["a"] and only_a.ensemble.weights == {"a": 1.0}  # renormalised over those kept
    assert len({p.id for p in points}) == 6
    # the ids depend on the settings only: the same design gives the same folders (a rerun finds them)
    assert [p.id for p in design_points(make_design(sweep, [], [], False))] == [p.id for p in points]
    assert point_id({"models.b.sharpness": 1.0}, "0123456789") == "b.sharpness=1.0-01234567"


@pytest.mark.parametrize(("grid", "message"), [
    (["models.a.sharpnes=1.0,2.0"], "--grid models.a.sharpnes: unknown key 'sharpnes' in models.a; did you mean "
                                    "'sharpness'?"),
    (["models.c.sharpness=1.0"], "--grid models.c.sharpness: no model 'c' in the base config (models: a, b)"),
    (["scoring=joint_softmax_mean,bogus"], "--grid scoring=bogus: scoring is 'bogus', expected one of"),
    (["models.a.batch_size=8,eight"],
     "--grid models.a.batch_size=eight: models.a.batch_size must be int, got 'eight'"),
    (["models.a.sharpness="], "--grid models.a.sharpness: no values (give at least one)"),
    (["scoring=mean_logit,mean_logit"], "--grid scoring: the value 'mean_logit' is listed twice"),
    (["transductive.method=em_prior,ot_asign"], "--grid transductive.method=ot_asign: transductive.method: 'ot_asign' "
                                                "is not a registered transductive method"),
    (["ensemble.weights.a=0.6,0.7"], "--grid ensemble.weights.a=0.7: ensemble.weights must be >= 0 and sum to 1"),
    (["--zip", "scoring=mean_logit", "ensemble.drop_below=0.01"],  # each fine alone, not together
     "the point scoring=mean_logit, ensemble.drop_below=0.01: ensemble.drop_below acts on per-prompt probabilities"),
    (["models=[a],[c]"], "--grid models: no model 'c' in the base config"),
    (["sharpness"], "--grid sharpness: expected KEY=V1,V2,..."),
])
def test_a_bad_grid_is_one_error_line_before_anything_runs(two_models, tmp_path, capsys, grid, message):
    args = ["sweep", str(two_models), "--output-dir", str(tmp_path / "sweep")]
    for g in grid:
        args += [g] if g.startswith("--") else ["--grid", g]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()  # nothing ran, nothing written


def test_zip_needs_lists_of_equal_length(two_models, capsys):
    assert main(["sweep", str(two_models), "--zip", "--grid", "models.a.sharpness=1,2", "--grid",
                 "scoring=mean_logit"]) == 2
    assert "--zip pairs lists of equal length: models.a.sharpness has 2, scoring has 1" in capsys.readouterr().err


def test_options_that_cannot_work_together_are_refused(two_models, capsys, monkeypatch, tmp_path):
    assert main(["sweep", str(two_models), "--gpus", "0,1", "--jobs", "3"]) == 2
    assert "one point per GPU at a time" in capsys.readouterr().err
    assert main(["sweep", str(two_models), "--gpus", "0,x"]) == 2
    assert "--gpus lists GPU indices (0,1,...), got 'x'" in capsys.readouterr().err
    assert main(["sweep", str(two_models), "--gpus", "0", "--executor", "slurm"]) == 2
    assert "--gpus-per-job" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["sweep", str(two_models), "--executor", "slurm"]) == 2
    assert "--executor slurm submits with sbatch, which is not on PATH here" in capsys.readouterr().err


def test_a_slurm_sweep_may_be_started_where_its_gpus_are_not(two_models, tmp_path):
    from helpers.infra.errors import UserError
    from helpers.runs.sweep import Sweep, check_points

    design = make_design(two_models, ["device=cuda"], ["scoring=mean_logit"], False)
    sweep = Sweep(design, design_points(design), tmp_path / "sweep")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):  # run here, the points would all fail
            check_points(sweep, here=True)
    check_points(sweep, here=False)  # the weights are checked; the device is the jobs' machine's


def test_points_wait_for_the_base_and_for_whoever_encodes_their_images(two_models):
    points = design_points(make_design(two_models, [], ["models.a.sharpness=2.3,1.0", "scoring=joint_softmax_mean,"
                                                        "mean_logit"], False))
    ids = {(p.config.models["a"].sharpness, p.config.scoring): p.id for p in points}
    waits = dependencies(points)
    base = ids[(2.3, "joint_softmax_mean")]
    assert waits[base] == set()
    assert waits[ids[(2.3, "mean_logit")]] == {base}  # the base encoded its images
    assert waits[ids[(1.0, "joint_softmax_mean")]] == {base}  # new images for a: it encodes them
    assert waits[ids[(1.0, "mean_logit")]] == {base, ids[(1.0, "joint_softmax_mean")]}
    # with the analyses, also for the first point that computes one it shares: b's prompt ablation under mean_logit
    waits = dependencies(points, analyses=True)
    assert waits[ids[(1.0, "mean_logit")]] == {base, ids[(1.0, "joint_softmax_mean")], ids[(2.3, "mean_logit")]}


def test_sbatch_flags_and_what_a_failed_run_said(tmp_path):
    assert sbatch_parameters(["--account=lab --qos=high", "--exclusive"]) == {
        "account": "lab", "qos": "high", "exclusive": True}
    with pytest.raises(SweepError, match="sbatch's long options"):
        sbatch_parameters(["-A lab"])
    log = tmp_path / "p.log"
    log.write_text("model a: running 04\nerror: 04_inference.ipynb failed in cell In [3] (`x`): boom\n")
    assert failure_of(log, 2) == "04_inference.ipynb failed in cell In [3] (`x`): boom"
    log.write_text("Traceback ...\nRuntimeError: out of memory\n")
    assert failure_of(log, 1) == "exit status 1: RuntimeError: out of memory"
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"images": 16}\n{"images": 8}\n{"imag')  # the last line cut short by a kill
    assert images_encoded(ledger) == 24


def test_a_submitted_job_replaces_the_running_status_of_an_earlier_job(tmp_path, monkeypatch):
    """A job that Slurm ended (scancel, its time limit) leaves its point `running` under its id: the next job's id
    is recorded over it, so that a rerun finds the job that is queued now; a job that started and wrote its own
    `running` before the submission returned keeps it."""
    from types import SimpleNamespace

    from helpers.runs.sweep.launch import PointJob, SlurmOptions, SubmititLauncher, read_status

    status = tmp_path / "p.json"
    job = PointJob(point="p", config_file="c.yaml", run_dir=str(tmp_path / "run"), status_file=str(status),
                   log_file=str(tmp_path / "p.log"), ledger_file=str(tmp_path / "p.jsonl"), cwd=str(tmp_path),
                   executor="submitit-local")
    launcher = SubmititLauncher("submitit-local", tmp_path / "submitit", SlurmOptions(), jobs=1)
    next_id = iter(["12", "13"])
    monkeypatch.setattr(launcher.executor, "submit", lambda fn, job: SimpleNamespace(job_id=next(next_id)))
    status.write_text(json.dumps({"point": "p", "status": "running", "executor": "submitit-local", "job_id": "11"}))
    launcher.start(job)
    assert {k: read_status(status)[k] for k in ("status", "job_id")} == {"status": "submitted", "job_id": "12"}
    own = {"point": "p", "status": "running", "executor": "submitit-local", "job_id": "13", "run_pid": 7}
    status.write_text(json.dumps(own))
    launcher.start(job)
    assert read_status(status) == own


# --- a real sweep: a tiny model, a handful of images, every point a papermill run (04 and 05)


def sweep_command(design: Path, folder: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "helpers", "sweep", str(design), "--output-dir", str(folder), "--no-analyses",
            "--quiet", *options]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, scene_dir, dev_dir, tiny_arch, tiny_checkpoints):
    """One sweep, as a researcher meets it: the base, a point that changes the scoring and adds the transductive
    stage (no image to encode) and one whose weights do not fit the model (it fails in 04). Started one at a time
    and killed outright while its second point runs; rerun, two points at a time, through submitit's local
    executor. What each step printed and left is kept. (Points that encode new images, and the order they wait in,
    are tested without running them.)"""
    tmp = tmp_path_factory.mktemp("sweep")
    config = base_config(tmp, scene_dir, dev_dir, tiny_arch, tiny_checkpoints[0], tmp / "cache")
    other = tmp / "other.pt"  # a checkpoint (the checks before the run pass), of no model of this architecture
    torch.save({"other.weight": torch.zeros(2)}, other)
    design = tmp / "sweep.yaml"
    design.write_text(yaml.safe_dump({"config": str(config), "points": [
        {"scoring": "mean_logit", "transductive.method": "transclip"}, {"models.a.pretrained": str(other)}]}))
    folder, statuses = tmp / "out", tmp / "out" / "status"
    env = {**os.environ, "HELPERS_RUN_INDEX": str(tmp / "index.csv")}
    found = {"config": config, "folder": folder, "index": tmp / "index.csv"}

    driver = subprocess.Popen(sweep_command(design, folder, "--jobs", "1"), env=env, cwd=PROJECT_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        second = [json.loads(p.read_text()) for p in statuses.glob("scoring=*.json")] if statuses.is_dir() else []
        if second and second[0].get("run_pid"):
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)  # the sweep dies outright, its second point's run just started
    driver.wait()
    found["killed"] = {p.stem: json.loads(p.read_text()) for p in statuses.glob("*.json")}

    # the rest through submitit's local executor (the path of --executor slurm), two at a time
    found["resumed"] = subprocess.run(sweep_command(design, folder, "--executor", "submitit-local", "--jobs", "2"),
                                      env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    found["report"] = pd.read_csv(folder / "sweep.csv", keep_default_na=False, na_values=[""])
    found["summary"] = json.loads((folder / "sweep.json").read_text())
    found["statuses"] = {p.stem: json.loads(p.read_text()) for p in statuses.glob("*.json")}
    return found


def test_a_failing_point_is_named_and_the_others_go_on(swept):
    result = swept["resumed"]
    assert result.returncode == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 points failed (a.pretrained="), last
    report = swept["report"]
    failed = report[report["status"] == "failed"]
    assert len(failed) == 1 and (report["status"] == "done").sum() == 2
    assert "04_inference.ipynb failed in cell In [" in failed["error"].iloc[0]
    assert f"point {failed['point'].iloc[0]} failed: 04_inference.ipynb failed in cell" in result.stderr


def test_a_killed_sweep_resumes_where_it_stopped(swept):
    killed = swept["killed"]
    base = next(k for k in killed if k.startswith("base-"))
    interrupted = next(k for k in killed if k.startswith("scoring="))
    assert killed[base]["status"] == "done" and killed[interrupted]["status"] == "running"
    # its run ended with the sweep: nothing left behind to race the rerun
    pid = killed[interrupted]["run_pid"]
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "3 points (1 finished before, 2 to run), as submitit-local jobs" in swept["resumed"].stderr
    assert swept["statuses"][base] == killed[base]  # the finished point was not run again
    assert swept["statuses"][interrupted]["status"] == "done"


def test_two_at_a_time_writes_what_each_point_run_alone_writes_byte_for_byte(swept, tmp_path):
    from helpers.config import load_config
    from helpers.runs.pipeline import predict

    done = swept["report"].query("status == 'done'")["point"].tolist()
    assert len(done) == 2
    for point in done:  # each alone, one at a time, from an empty cache of its own
        config = load_config(swept["folder"] / "configs" / f"{point}.yaml", [f"cache_dir={tmp_path / 'cache'}"])
        predict(config, tmp_path / point, progress=False)
        alone = (tmp_path / point / "submission.csv").read_bytes()
        assert (swept["folder"] / "points" / point / "submission.csv").read_bytes() == alone, point


def test_submitit_ran_the_points_as_jobs(swept):
    folder = swept["folder"]
    assert len(list((folder / "submitit").glob("*_log.out"))) == 2  # submitit's own record of each job
    for point, status in swept["statuses"].items():
        if not point.startswith("base-"):
            assert status["pid"] != swept["killed"][next(iter(swept["killed"]))]["pid"]  # not the sweep's process


def test_jobs_run_side_by_side_on_this_machine_each_with_its_share_of_the_cores(monkeypatch):
    from helpers.runs.sweep import launch

    started, both = [], threading.Barrier(2, timeout=10)

    def run_point(job):
        started.append(dict(job.env))
        both.wait()  # returns only when the two run at the same time
        return {"point": job.point, "status": "done"}

    monkeypatch.setattr(launch, "run_point", run_point)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    def jobs():
        return [launch.PointJob(p, "", "", "", "", "", "") for p in ("x", "y")]

    results = launch.run_points(jobs(), {"x": {"base"}, "y": {"base"}}, launch.LocalLauncher(2), {"base"}, False)
    assert set(results) == {"x", "y"} and [e["OMP_NUM_THREADS"] for e in started] == ["4", "4"]
    gpus = launch.LocalLauncher(1, ["0", "3"])
    started.clear()
    both.reset()
    launch.run_points(jobs(), {"x": set(), "y": set()}, gpus, set(), False)
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in started) == ["0", "3"]  # one point per GPU, each its own
    assert all("OMP_NUM_THREADS" not in e for e in started)


def test_a_point_that_cannot_start_is_a_failed_point_and_the_others_go_on(monkeypatch, tmp_path):
    from helpers.runs.sweep import launch

    def run_point(job):
        if job.point == "x":
            raise PermissionError(13, "Permission denied", job.log_file)
        return {"point": job.point, "status": "done"}

    monkeypatch.setattr(launch, "run_point", run_point)
    jobs = [launch.PointJob(p, "", "", str(tmp_path / f"{p}.json"), f"/logs/{p}.log", "", "") for p in ("x", "y")]
    results = launch.run_points(jobs, {}, launch.LocalLauncher(1), set(), False)
    assert results["y"]["status"] == "done" and results["x"]["status"] == "failed"
    assert results["x"]["error"].startswith("the point could not run: /logs/x.log: permission denied")
    assert json.loads((tmp_path / "x.json").read_text())["status"] == "failed"  # a rerun redoes it


def test_the_report_holds_what_each_point_wrote(swept):
    folder, report = swept["folder"], swept["report"].set_index("point")
    summary = swept["summary"]
    assert summary["points_total"] == 3 and summary["points_failed"] == 1 and summary["random_weights"] == []
    assert [p["point"] for p in summary["points"]] == list(report.index)
    recorded = {p["point"]: p for p in summary["points"]}  # sweep.json: intervals as ci95 pairs, as in metrics.json
    assert not any(key.endswith(("_ci_low", "_ci_high")) for p in summary["points"] for key in p)
    assert (folder / "figures" / "sweep.png").is_file()
    base = report.index[report["base"]][0]
    for point, row in report[report["status"] == "done"].iterrows():
        metrics = json.loads((folder / "points" / point / "metrics.json").read_text())
        dev, reference = metrics["dev"]["ensemble"], metrics["test"]["reference"]
        assert row["dev_accuracy"] == pytest.approx(dev["accuracy"])
        assert [row["dev_accuracy_ci_low"], row["dev_accuracy_ci_high"]] == pytest.approx(dev["ci95"])
        assert recorded[point]["dev_accuracy_ci95"] == pytest.approx(dev["ci95"])
        assert row["reference_agreement"] == pytest.approx(reference["agreement"])
        interval = [row["reference_agreement_ci_low"], row["reference_agreement_ci_high"]]
        assert interval == pytest.approx(reference["ci95"])
        assert row["seconds"] > 0
        if point == base:
            assert pd.isna(row["base_agreement"]) and pd.isna(row["dev_delta_vs_base"])
            continue
        compared = compare_runs(folder / "points" / base, folder / "points" / point, folder / "compare" / point)
        assert row["base_agreement"] == pytest.approx(compared["agreement"])
        delta = compared["dev"]["b_minus_a"]
        assert row["dev_delta_vs_base"] == pytest.approx(delta["delta"])
        assert row["dev_mcnemar_p"] == pytest.approx(delta["mcnemar_p"])
    encoded = report["images_encoded"]
    assert encoded[base] > 0
    assert encoded[report.index.str.startswith("scoring=")].tolist() == [0]  # the base's images: from the cache
    staged = report.index[report.index.str.startswith("scoring=")][0]
    assert staged.startswith("scoring=mean_logit_method=transclip-")
    stage = json.loads((folder / "points" / staged / "metrics.json").read_text())["transductive"]
    assert stage["method"] == "transclip" and "transductive" not in json.loads(
        (folder / "points" / base / "metrics.json").read_text())


def test_min_agreement_names_the_points_below_it(swept):
    from helpers.infra.errors import BelowMinimumAgreement
    from helpers.runs.sweep import Sweep, SweepOptions, report

    # the last sweep's points, both done
    design = make_design(swept["config"], [], ["scoring=mean_logit", "transductive.method=transclip"], False)
    sweep = Sweep(design, design_points(design), swept["folder"])
    with pytest.raises(BelowMinimumAgreement, match="2 of 2 points agree with the reference below --min-agreement "
                                                    "0.999"):
        report(sweep, SweepOptions(min_agreement=0.999), log=lambda message: None)
    assert report(sweep, SweepOptions(min_agreement=0.0), log=lambda message: None)["points_done"] == 2


def test_runs_shows_one_sweeps_points(swept, capsys, monkeypatch):
    monkeypatch.setenv("HELPERS_RUN_INDEX", str(swept["index"]))
    assert main(["runs", "--sweep", str(swept["folder"])]) == 0
    out = capsys.readouterr().out
    done = swept["report"].query("status == 'done'")["point"]
    assert all(point in out for point in done)
    assert main(["runs", "--sweep", str(swept["folder"] / "points" / done.iloc[0])]) == 0
    assert capsys.readouterr().out.count("sweep-test") == 1


def test_a_job_that_ended_without_a_result_is_a_failed_point_with_the_end_of_its_log(tmp_path):
    """A job whose function never ran (here: its interpreter could not import the workbench, as on a node that does
    not see the checkout): the point fails with the last line of the job's own log."""
    from submitit.local.local import LocalJob

    from helpers.runs.sweep import launch

    launcher = launch.SubmititLauncher("submitit-local", tmp_path / "submitit", launch.SlurmOptions(), None)
    job = launch.PointJob("x", "", "", str(tmp_path / "x.json"), "", "", "", executor="submitit-local")
    handle = LocalJob(tmp_path / "submitit", "12345")
    handle.paths.stderr.write_text("Traceback (most recent call last):\n"
                                   "ModuleNotFoundError: No module named 'helpers'\n")
    status = launcher.result(job, handle)
    assert status["status"] == "failed" and status["error"] == (
        f"job 12345 ended without a result; its log {handle.paths.stderr}: ModuleNotFoundError: No module named "
        "'helpers'")
    assert json.loads((tmp_path / "x.json").read_text())["status"] == "failed"  # a rerun redoes it
