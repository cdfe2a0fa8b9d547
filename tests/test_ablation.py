"""Ablations from the cache, on a labeled dev folder of real images, and test-time sharpening views."""

import numpy as np
import pytest
import torch

from helpers.research.ablation import (
    compare_predictions,
    drop_threshold_ablation,
    ensemble_weight_ablation,
    holm_adjust,
    load_model_embeddings,
    preprocessing_ablation,
    prompt_group_ablation,
    scoring_mode_ablation,
    sharpness_ablation,
    two_model_weights,
)
from helpers.research.scoring import joint_softmax_probs, score
from helpers.runs.pipeline import load_run_data, predict

from .conftest import INTEL_CLASS_MAP

COLUMNS = ["variant", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "delta", "delta_ci_low", "delta_ci_high",
           "p_value", "reference", "p_holm", "differs"]


@pytest.fixture
def dev_config(make_config, dev_dir):
    def make(**overrides):
        data = {"test": make_config().data.test, "dev": {"path": str(dev_dir), "class_map": INTEL_CLASS_MAP}}
        return make_config(data=data, **overrides)

    return make


def test_holm_adjustment_on_known_values():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_compare_predictions_marks_the_reference_and_real_differences():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 1000)
    base = np.where(rng.random(1000) < 0.8, labels, (labels + 1) % 6)
    better = np.where(base != labels, labels, base)  # fixes every error: +20 points
    noise = base.copy()
    noise[np.flatnonzero(base != labels)[:1]] = labels[np.flatnonzero(base != labels)[:1]]
    table = compare_predictions(labels, {"base": base, "better": better, "noise": noise}, "base")
    assert list(table.columns) == COLUMNS
    rows = table.set_index("variant")
    assert rows.loc["base", "reference"] and rows.loc["base", "delta"] == 0 and not rows.loc["base", "differs"]
    assert rows.loc["better", "differs"] and rows.loc["better", "delta_ci_low"] > 0
    assert not rows.loc["noise", "differs"] and rows.loc["noise", "delta"] == pytest.approx(0.001)
    assert (table["accuracy_ci_low"] <= table["accuracy"]).all()
    assert (table["accuracy"] <= table["accuracy_ci_high"]).all()


def test_prompt_and_scoring_ablations_run_from_cached_embeddings(dev_config, count_image_batches):
    config = dev_config()
    emb = load_model_embeddings(config, "a", progress=False)
    encoded = count_image_batches["n"]
    assert encoded == 1 and emb.image[0].shape == (24, 32) and emb.text.shape == (312, 32)
    groups = prompt_group_ablation(emb)
    assert groups["variant"].tolist()[:3] == ["all groups", "only name", "only basic"]
    assert len(groups) == 11 and groups["reference"].sum() == 1
    counts = groups.set_index("variant")["prompts"]
    assert counts["all groups"] == 312 and counts["only name"] == 6 and counts["without descriptions"] == 294
    modes = scoring_mode_ablation(emb)
    assert modes["variant"].tolist() == ["joint_softmax_mean", "mean_logit", "prototype"]  # the reference first
    # the reference row is the accuracy predict reports
    expected = score("joint_softmax_mean", emb.image[0], emb.text, emb.prompts.class_index, 6).labels
    assert groups.iloc[0]["accuracy"] == pytest.approx(np.mean(expected == emb.labels))
    load_model_embeddings(config, "a", progress=False)
    assert count_image_batches["n"] == encoded  # the second time, from the cache


def test_sharpness_ablation_encodes_each_factor_once(dev_config, count_image_batches):
    config = dev_config()
    factors = [1.0, 2.3, [1.5, 2.0, 2.5]]
    table = sharpness_ablation(config, "a", factors, progress=False)
    assert table["variant"].tolist() == ["1", "2.3", "1.5+2+2.5"]
    assert table.set_index("variant").loc["2.3", "reference"]  # model a is configured at 2.3
    assert count_image_batches["n"] == 5  # five distinct factors, one batch of 24 dev images each
    again = sharpness_ablation(config, "a", factors, progress=False)
    assert count_image_batches["n"] == 5
    assert again.equals(table)


def test_ensemble_weight_and_drop_ablations(dev_config, tmp_path):
    config = dev_config()
    predict(config, tmp_path / "run", progress=False)
    from helpers.runs.pipeline import load_model_scores

    data = load_run_data(config)
    scores = {n: load_model_scores(tmp_path / "run", n, "dev", config.scoring) for n in "ab"}
    labels = data.splits["dev"].labels
    weights = ensemble_weight_ablation(scores, labels, data.prompts, two_model_weights("a", "b"), {"a": 0.5, "b": 0.5})
    assert weights.loc[weights["reference"], "variant"].tolist() == ["a=0.5, b=0.5"]
    assert weights["variant"].str.extract(r"a=([0-9.]+),")[0].astype(float).is_monotonic_increasing  # by a
    assert len(weights) == 8  # 0.5 is the reference and also in the grid: listed once
    drops = drop_threshold_ablation(scores, labels, data.prompts, {"a": 0.5, "b": 0.5})
    assert drops["variant"].tolist() == ["none", "0.0005", "0.001", "0.002", "0.005", "0.01"]


def test_sharpness_views_average_the_probabilities(dev_config, tmp_path):
    entry = vars(dev_config().models["a"])
    config = dev_config(models={"a": {**entry, "sharpness": [1.5, 2.5]}}, ensemble={})
    predict(config, tmp_path / "run", progress=False)
    out = tmp_path / "run" / "models" / "a" / "test"
    views = np.load(out / "image_embeddings.npy")
    assert views.shape == (2, 38, 32)
    text = np.load(tmp_path / "run" / "models" / "a" / "text_embeddings.npy")
    expected = torch.stack([joint_softmax_probs(v, text) for v in views]).mean(0).numpy()
    np.testing.assert_allclose(np.load(out / "prompt_probs.npy"), expected, rtol=1e-6)


def test_the_benchmark_ablation_has_ten_variants_of_the_winner_set():
    from helpers.bench.runners import ablation_variants
    from helpers.research.prompts import load_prompts

    from .conftest import CLASSES

    variants = ablation_variants(load_prompts("winner", CLASSES))
    assert len(variants) == 10 and len(variants["all"]) == 312 and len(variants["only imagenet41"]) == 246
    assert len(variants["without blur"]) == 288


def test_a_notebook_shows_each_interval_beside_its_value():
    from helpers.display.nb import compact_table

    labels = np.array([0, 1, 2, 0, 1, 2] * 10)
    table = compare_predictions(labels, {"ref": labels, "other": np.roll(labels, 1)}, "ref")
    shown = compact_table(table)
    assert list(shown.columns) == ["variant", "accuracy [95% CI]", "Δ vs reference [95% CI]", "p (Holm)", "reference",
                                   "differs"]
    assert shown["accuracy [95% CI]"].iloc[0] == "1.000 [1.000, 1.000]"
    assert shown["Δ vs reference [95% CI]"].iloc[1].startswith("-1.000 [")


@pytest.mark.parametrize("ablation", ["sharpness", "preprocessing", "embeddings"])
def test_an_ablation_without_a_labeled_split_is_one_clear_error(ablation, make_config):
    config = make_config(data={"test": make_config().data.test, "limit": 4})
    run = {"sharpness": lambda: sharpness_ablation(config, "a", [2.3], progress=False),
           "preprocessing": lambda: preprocessing_ablation(config, "a", progress=False),
           "embeddings": lambda: load_model_embeddings(config, "a", progress=False)}[ablation]
    with pytest.raises(ValueError, match=r"^no labeled split 'dev' in the config \(data.dev gives one\)$"):
        run()
