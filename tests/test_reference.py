"""Runs that check themselves against a reference submission: the agreement in metrics.json, and --min-agreement's
exit status for scheduled runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.__main__ import main
from helpers.runs.history import read_history
from helpers.runs.outputs import SubmissionError, list_references, read_submission, reference_agreement
from helpers.runs.pipeline import predict

from .conftest import SHARED_DATA, require_shared
from .test_predict import write_config


@pytest.fixture
def synthetic_reference(make_config, tmp_path):
    """A clean run's submission with the labels of 5 of its 38 images changed: agreement 33/38 by construction."""
    predict(make_config(), tmp_path / "clean", progress=False)
    ids, labels = read_submission(tmp_path / "clean" / "submission.csv")
    changed = [(y + 1) % 6 if k in (0, 3, 9, 20, 37) else y for k, y in enumerate(labels)]
    path = tmp_path / "reference.csv"
    path.write_text("id_idx,label\n" + "".join(f"{i},{y}\n" for i, y in zip(ids, changed)))
    return path


def test_the_agreement_with_the_reference_is_in_metrics(make_config, synthetic_reference, tmp_path):
    metrics = predict(make_config(reference=str(synthetic_reference)), tmp_path / "out", progress=False)
    found = metrics["test"]["reference"]
    assert found["agreement"] == pytest.approx(33 / 38) and found["differing"] == 5 and found["images"] == 38
    lo, hi = found["ci95"]
    assert lo <= 33 / 38 <= hi and found["not_in_reference"] == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]["reference"] == found


def test_min_agreement_exits_with_status_3_after_writing_everything(make_config, synthetic_reference, tmp_path,
                                                                    capsys):
    config = write_config(tmp_path, make_config(reference=str(synthetic_reference)))
    assert main(["predict", config, "--output-dir", str(tmp_path / "low"), "--quiet", "--min-agreement", "0.9"]) == 3
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: agreement 0.8684 with {synthetic_reference} (5 of 38 images differ) is "
                                    f"below --min-agreement 0.9; everything was written to {tmp_path / 'low'}")
    assert "Traceback" not in err  # before the error line, the notes: every embedding came from the cache
    assert (tmp_path / "low" / "submission.csv").is_file() and (tmp_path / "low" / "manifest.json").is_file()
    assert main(["predict", config, "--output-dir", str(tmp_path / "ok"), "--quiet", "--min-agreement", "0.85"]) == 0


def test_every_predict_appends_its_row_to_the_history(make_config, synthetic_reference, tmp_path, run_index, capsys):
    config = write_config(tmp_path, make_config(reference=str(synthetic_reference)))
    for out in ("first", "second"):
        assert main(["predict", config, "--output-dir", str(tmp_path / out), "--quiet"]) == 0
    history = read_history(run_index)
    assert history["run_folder"].tolist() == [str(tmp_path / "second"), str(tmp_path / "first")]  # latest first
    assert (history["command"] == "predict").all() and (history["config_name"] == "test").all()
    assert history["reference_agreement"].tolist() == pytest.approx([33 / 38] * 2)
    capsys.readouterr()
    assert main(["runs"]) == 0 and str(tmp_path / "second") in capsys.readouterr().out


def test_min_agreement_without_a_reference_fails_before_any_work(make_config, tmp_path, capsys):
    config = write_config(tmp_path, make_config())
    assert main(["predict", config, "--output-dir", str(tmp_path / "o"), "--min-agreement", "0.9"]) == 2
    assert "--min-agreement needs a test set and a reference in the config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_winners_submission_is_shipped_and_is_the_reproductions_reference():
    assert "winner-116" in list_references()
    shared = require_shared(SHARED_DATA.parent / "reference" / "winner-submission-116.csv")
    ids, labels = read_submission(shared)
    assert reference_agreement("winner-116", ids, labels)["agreement"] == 1.0  # the shipped copy is that file
    assert len(ids) == 8100 and np.bincount(labels).sum() == 8100
    from helpers.config import load_config

    from .conftest import PROJECT_ROOT
    assert load_config(PROJECT_ROOT / "configs" / "winner.yaml").reference == "winner-116"


def test_a_reference_that_is_not_there_or_not_of_this_test_set_is_one_line(make_config, tmp_path, capsys):
    config = write_config(tmp_path, make_config(reference="winner-117"))
    assert main(["predict", config, "--output-dir", str(tmp_path / "o")]) == 2
    assert "reference: no built-in reference 'winner-117' (built-in: winner-116" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("id_idx,label\n90000,1\n")
    with pytest.raises(SubmissionError, match="has none of the run's test ids"):
        reference_agreement(str(other), [0, 1], [1, 2])
