"""The run history: records appended under a lock (several processes at once), read back latest first, built from
a finished predict run, and shown by `python -m helpers runs`."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from helpers.__main__ import main
from helpers.config import json_digest
from helpers.runs.history import (
    COLUMNS,
    HistoryError,
    append_run_record,
    read_history,
    record_run,
    run_record,
)
from helpers.runs.pipeline import predict

from .conftest import INTEL_CLASS_MAP, PROJECT_ROOT


def record(i: int, time: str, **extra) -> dict:
    return {"time": time, "run_folder": f"outputs/runs/r{i}", "config_name": f"cfg{i}",
            "config_hash": "0" * 15 + str(i),
            "git_commit": "abc123def456", "models": f"a=open_clip:ViT-B-32-quickgelu@random#{i:08x}",
            "random_weights": i % 2 == 0, "reference_agreement": None, "dev_accuracy": 0.5 + i / 100,
            "seconds": 1.5 * i, "command": "predict" if i % 2 else "run", "world_size": 1 + i % 2, **extra}


def test_records_are_appended_and_read_back_latest_first(tmp_path):
    index = tmp_path / "runs" / "index.csv"
    assert read_history(index).empty and list(read_history(index).columns) == COLUMNS
    times = ["2025-01-02T10:00:00+00:00", "2025-01-03T09:00:00+00:00", "2025-01-01T08:00:00+00:00",
             "2025-01-03T09:00:00+00:00"]  # out of order, two at the same second
    for i, t in enumerate(times):
        assert append_run_record(index, record(i, t, reference_agreement=0.9 if i == 1 else None)) == index
    lines = index.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 5  # the header once
    history = read_history(index)
    assert list(history.columns) == COLUMNS
    assert list(history["config_name"]) == ["cfg3", "cfg1", "cfg0", "cfg2"]  # the later of equal times first
    first = history.iloc[1]
    assert first["reference_agreement"] == 0.9 and first["dev_accuracy"] == pytest.approx(0.51)
    assert first["config_hash"] == "0" * 15 + "1" and first["git_commit"] == "abc123def456"
    assert first["command"] == "predict" and first["world_size"] == 2 and first["seconds"] == 1.5
    assert history["random_weights"].tolist() == [False, False, True, True]
    assert history["reference_agreement"].isna().sum() == 3
    # a record without time gets now; an unknown field is a mistake
    append_run_record(index, {k: v for k, v in record(9, "").items() if k != "time"})
    assert read_history(index).iloc[0]["config_name"] == "cfg9"
    with pytest.raises(ValueError, match="unknown field"):
        append_run_record(index, {**record(1, times[0]), "colour": "red"})


def test_a_row_cut_short_leaves_later_rows_whole(tmp_path):
    index = tmp_path / "index.csv"
    append_run_record(index, record(1, "2025-01-01T00:00:00+00:00"))
    with open(index, "a") as f:
        f.write("2025-01-01T00:00:01+00:00,outputs/runs/cut")  # a writer that died half-way, without the lock
    append_run_record(index, record(2, "2025-01-02T00:00:00+00:00"))
    rows = list(csv.reader(index.open()))
    assert rows[-1][COLUMNS.index("config_name")] == "cfg2" and len(rows[-1]) == len(COLUMNS)
    assert read_history(index).iloc[0]["config_name"] == "cfg2"


def test_a_file_that_is_not_an_index_is_refused(tmp_path, capsys):
    index = tmp_path / "index.csv"
    index.write_text("id_idx,label\n0,1\n")
    with pytest.raises(HistoryError, match="not a run index"):
        append_run_record(index, record(1, "2025-01-01T00:00:00+00:00"))
    assert index.read_text() == "id_idx,label\n0,1\n"
    assert main(["runs", "--index", str(index)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run index" in err[0]


WRITER = textwrap.dedent("""
    import sys, types
    # helpers.runs.history without the package's __init__ (which imports torch): the writers start in a second, not ten
    package = types.ModuleType("helpers")
    package.__path__ = ["helpers"]
    sys.modules["helpers"] = package
    from helpers.runs.history import append_run_record

    index, writer, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pad = "x" * 20000  # rows larger than a pipe buffer or a page: torn by any writer that appends in pieces
    sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()  # start together
    for i in range(n):
        append_run_record(index, {"run_folder": f"{writer}/{i}", "config_name": writer, "models": pad,
                                  "command": "predict", "world_size": 1, "seconds": i})
""")


def test_processes_appending_at_once_give_every_row_whole(tmp_path):
    index, writers, n = tmp_path / "runs" / "index.csv", ["w0", "w1", "w2"], 50
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(index), w, str(n)], cwd=PROJECT_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for w in writers]
    for p in procs:  # every writer has imported and waits
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.wait(timeout=120) == 0
    text = index.read_text()
    assert text.endswith("\n") and text.count("\n") == 1 + len(writers) * n
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == COLUMNS
    assert all(len(r) == len(COLUMNS) and r[COLUMNS.index("models")] == "x" * 20000 for r in rows[1:])
    folders = sorted(r[COLUMNS.index("run_folder")] for r in rows[1:])
    assert folders == sorted(f"{w}/{i}" for w in writers for i in range(n))  # exactly all, once each
    assert len(read_history(index)) == len(writers) * n


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory, scene_dir, dev_dir, tiny_arch, tiny_checkpoints):
    from helpers.config import config_from_dict

    a, b = tiny_checkpoints
    tmp = tmp_path_factory.mktemp("history-run")
    model = {"backend": "open_clip", "arch": str(tiny_arch)}
    config = config_from_dict({
        "name": "history", "data": {"test": str(scene_dir), "limit": 8,
                                    "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP, "limit": 12}},
        "models": {"a": {**model, "pretrained": str(a), "sharpness": 2.3},
                   "b": {**model, "pretrained": str(b), "sharpness": 2.0}},
        "cache_dir": str(tmp / "cache"), "num_workers": 0})
    metrics = predict(config, tmp / "run", progress=False)
    return config, tmp / "run", metrics


def test_run_record_of_a_predict_run(predict_run, tmp_path, capsys):
    import json

    config, run, metrics = predict_run
    rec = run_record(config, run, metrics, 12.345, "predict", 1)
    assert set(rec) == set(COLUMNS)
    manifest = json.loads((run / "manifest.json").read_text())
    assert rec["config_name"] == "history" and rec["config_hash"] == json_digest(config.to_dict())
    assert rec["run_folder"] == str(run.resolve())  # outside the project: absolute
    assert rec["git_commit"] == (manifest["git"]["commit"][:12] + ("-dirty" if manifest["git"]["dirty"] else "")
                                 if manifest["git"]["commit"] else None)
    ids = {n: json_digest(m["identity"])[:8] for n, m in manifest["models"].items()}
    assert rec["models"] == f"a=open_clip:tiny-quickgelu@a.pt#{ids['a']};b=open_clip:tiny-quickgelu@b.pt#{ids['b']}"
    assert rec["random_weights"] is False
    assert rec["dev_accuracy"] == metrics["dev"]["ensemble"]["accuracy"]
    assert rec["reference_agreement"] is None  # no reference yet
    assert (rec["seconds"], rec["command"], rec["world_size"]) == (12.3, "predict", 1)
    # the reference agreement where metrics.json has it; read defensively where it has something else
    with_ref = {**metrics, "test": {**metrics["test"], "reference": {"agreement": 0.97, "images": 8}}}
    assert run_record(config, run, with_ref, 1, "run", 2)["reference_agreement"] == 0.97
    for odd in ({"test": {"reference": "none"}}, {"test": {"reference": {"agreement": "high"}}}, {}, None):
        assert run_record(config, run, odd, 1, "run", 1)["reference_agreement"] is None
    with pytest.raises(ValueError, match="command"):
        run_record(config, run, metrics, 1, "encode", 1)

    index = tmp_path / "index.csv"
    append_run_record(index, rec)
    later = {**run_record(config, run, metrics, 3, "run", 2), "time": "2999-01-01T00:00:00+00:00"}
    append_run_record(index, later)
    assert main(["runs", "--index", str(index)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["time", "(UTC)", "command", "config", "models", "random", "agreement", "dev", "acc",
                              "seconds", "run", "folder"]
    assert len(out) == 3 and out[1].split()[:2] == ["2999-01-01", "00:00"] and "nan" not in "".join(out).lower()
    assert str(run.resolve()) in out[2] and "predict" in out[2] and f"a#{ids['a']}" in out[2]
    assert max(map(len, out)) < 160  # a terminal's width (the run folder, last, is as long as its path)
    assert main(["runs", "--index", str(index), "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[-1] == "(1 of 2 runs; --limit shows more)"


def test_run_record_without_a_manifest_and_with_random_weights(make_config, tmp_path):
    config = make_config(models={"a": {"backend": "open_clip", "arch": "ViT-B-32-quickgelu", "pretrained": "random",
                                       "seed": 3}},
                         ensemble={"weights": None, "drop_below": None})
    rec = run_record(config, tmp_path / "not-run-yet", {"test": {}}, 0.04, "run", 1)
    identity = {"backend": "open_clip", "arch": "ViT-B-32-quickgelu", "pretrained": "random", "revision": None,
                "precision": "auto", "seed": 3}
    assert rec["models"] == f"a=open_clip:ViT-B-32-quickgelu@random#{json_digest(identity)[:8]}"
    assert rec["random_weights"] is True and rec["dev_accuracy"] is None
    inside = PROJECT_ROOT / "outputs" / "runs" / "x"
    assert run_record(config, inside, {}, 1, "run", 1)["run_folder"] == "outputs/runs/x"


def test_record_run_warns_instead_of_failing(make_config, tmp_path, caplog):
    config = make_config()
    (tmp_path / "index.csv").mkdir()  # a folder where the index should be
    with caplog.at_level(logging.WARNING, logger="helpers.runs.history"):
        assert record_run(config, tmp_path, {}, 1, "predict", 1, index_path=tmp_path / "index.csv") is None
    assert "run history was not updated" in caplog.text
    rec = record_run(config, tmp_path, {}, 1, "predict", 1, index_path=tmp_path / "ok.csv")
    assert rec is not None and read_history(tmp_path / "ok.csv").iloc[0]["run_folder"] == rec["run_folder"]


def test_runs_without_history_says_so(tmp_path, capsys, monkeypatch):
    assert main(["runs", "--index", str(tmp_path / "none.csv")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("no runs recorded yet in")
    monkeypatch.setenv("HELPERS_RUN_INDEX", str(tmp_path / "env.csv"))
    append_run_record(None, record(1, "2025-01-01T00:00:00+00:00"))
    assert main(["runs"]) == 0
    assert "cfg1" in capsys.readouterr().out
    assert isinstance(read_history(), pd.DataFrame) and len(read_history()) == 1
