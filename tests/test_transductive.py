"""The transductive stage: each method on synthetic sets whose answer is known (class clusters on the unit sphere,
text prototypes offset from the cluster means so that zero-shot errs, a skewed class prior), the registry and the
config's checks, and the stage end to end in `predict` on the tiny models and real images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers.config import ConfigError
from helpers.research.transductive import METHODS, apply_transductive, knn_graph
from helpers.research.transductive.em_prior import estimate_prior
from helpers.research.transductive.ot_assign import target_counts
from helpers.research.transductive.stage import joint_embeddings
from helpers.runs.outputs import metrics_summary, read_submission
from helpers.runs.pipeline import predict

SKEWED = (0.35, 0.25, 0.15, 0.1, 0.1, 0.05)
UNIFORM = (1 / 6,) * 6


def clustered_set(prior=SKEWED, n: int = 2400, dim: int = 64, noise: float = 0.35, offset: float = 0.6,
                  seed: int = 0):
    """Images of 6 classes, exactly `prior` * n of each: a class mean on the unit sphere plus Gaussian noise,
    normalised; the zero-shot posteriors are the Bayes posteriors' softmax (the temperature a Gaussian cluster of
    this spread gives) over text prototypes offset at random from the means, and assume equal priors. Returns
    (probabilities, embeddings, true labels, true prior)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((len(prior), dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    counts = target_counts(np.asarray(prior), n)
    labels = np.repeat(np.arange(len(prior)), counts)
    x = means[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    text = means + offset * rng.standard_normal(means.shape) / np.sqrt(dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    logits = np.sqrt(1 + dim * noise**2) / noise**2 * (x @ text.T)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), x.astype(np.float32), labels, counts / n


def accuracy(probs, labels) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("method", "params"), [("em_prior", {}), ("ot_assign", {"target": list(SKEWED)}),
                                                ("label_propagation", {}), ("transclip", {})])
def test_each_method_beats_zero_shot_on_a_clustered_set_with_a_skewed_prior(method, params, seed):
    probs, embeddings, labels, _ = clustered_set(seed=seed)
    zero_shot = accuracy(probs, labels)
    assert 0.8 < zero_shot < 0.9  # the offset prototypes err on about one image in seven
    out = apply_transductive(method, probs, embeddings, **params)
    assert out.shape == probs.shape and np.allclose(out.sum(axis=1), 1) and (out >= 0).all()
    assert accuracy(out, labels) >= zero_shot + 0.01, method


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_recovers_the_prior_and_leaves_a_uniform_set_essentially_unchanged(seed):
    probs, _, _, prior = clustered_set(seed=seed)
    adjusted, estimated, steps = estimate_prior(probs, np.full(6, 1 / 6))
    assert np.abs(estimated - prior).max() < 0.02 and steps < 1000
    assert np.allclose(adjusted.mean(axis=0), estimated, atol=1e-5)  # EM's fixed point
    probs, embeddings, _, _ = clustered_set(UNIFORM, seed=seed)
    out = apply_transductive("em_prior", probs, embeddings)
    _, estimated, _ = estimate_prior(probs, np.full(6, 1 / 6))
    assert np.abs(estimated - 1 / 6).max() < 0.02
    assert (out.argmax(axis=1) != probs.argmax(axis=1)).mean() < 0.01
    # calibrated posteriors of a set whose classes are as frequent as assumed: EM's first step is already its end
    exact = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    assert np.allclose(apply_transductive("em_prior", exact, np.eye(4)), exact)


def test_ot_meets_the_target_counts_exactly():
    probs, embeddings, labels, prior = clustered_set(n=1001)  # counts that 1,001 does not divide evenly
    for target, expected in [(list(prior), target_counts(prior, 1001)), ("uniform", [167, 167, 167, 167, 167, 166]),
                             ([1, 1, 1, 1, 1, 5], [100, 100, 100, 100, 100, 501])]:
        out = apply_transductive("ot_assign", probs, embeddings, target=target)
        assert np.array_equal(np.bincount(out.argmax(axis=1), minlength=6), expected), target
        assert np.array_equal(out, np.eye(6)[out.argmax(axis=1)])  # an assignment: one class per image
    em = apply_transductive("ot_assign", probs, embeddings, target="em")
    expected = target_counts(estimate_prior(probs, np.full(6, 1 / 6))[1], 1001)
    assert np.array_equal(np.bincount(em.argmax(axis=1), minlength=6), expected)
    assert target_counts(np.array([0.5, 0.25, 0.25]), 7).tolist() == [3, 2, 2]  # the largest remainders
    assert target_counts(np.full(3, 1 / 3), 4).tolist() == [2, 1, 1]  # ties to the lower class


def test_the_methods_are_deterministic_and_take_a_memory_map(tmp_path):
    probs, embeddings, _, _ = clustered_set(n=600)
    np.save(tmp_path / "e.npy", embeddings)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    for name in METHODS.names():
        first = apply_transductive(name, probs, embeddings)
        assert np.array_equal(first, apply_transductive(name, probs, mapped)), name


def test_the_knn_graph_in_tiles_is_the_exact_graph():
    _, embeddings, _, _ = clustered_set(n=300)
    whole = knn_graph(embeddings, 5, block=512)  # one tile
    tiles = knn_graph(embeddings, 5, block=7)  # 43 x 43 tiles, the last padded
    assert np.array_equal(whole[0], tiles[0]) and np.allclose(whole[1], tiles[1], atol=1e-6)
    sims = embeddings.astype(np.float64) @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    assert np.array_equal(np.argsort(-sims, axis=1, kind="stable")[:, :5], whole[0])
    assert np.allclose(np.take_along_axis(sims, whole[0], axis=1), whole[1], atol=1e-6)
    duplicates = np.repeat(embeddings[:3], 4, axis=0)  # ties: the lower index first
    assert knn_graph(duplicates, 3, block=5)[0][0].tolist() == [1, 2, 3]


def test_joint_embeddings_weigh_each_models_cosine():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((5, d)) for d in (4, 3))
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    joint = joint_embeddings({"a": a, "b": b, "c": a}, {"a": 0.3, "b": 0.7, "c": 0.0})
    assert joint.shape == (5, 7) and np.allclose(joint @ joint.T, 0.3 * a @ a.T + 0.7 * b @ b.T, atol=1e-6)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: apply_transductive("em_priors", np.full((2, 2), 0.5), np.eye(2)), "did you mean 'em_prior'"),
    (lambda: apply_transductive("transclip", np.full((2, 2), 0.5), np.eye(2), lam=1), "no parameter 'lam'"),
    (lambda: apply_transductive("ot_assign", np.full((2, 2), 0.5), np.eye(2), target=[1, 2, 3]), "3 numbers for 2"),
    (lambda: apply_transductive("em_prior", np.full((2, 2), 0.6), np.eye(2)), "must sum to 1"),
    (lambda: apply_transductive("em_prior", np.full((2, 2), 0.5), np.eye(3)), "2 rows of probabilities but 3"),
])
def test_bad_calls_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_has_its_paper_defaults_and_a_docstring_that_cites_it(name):
    cls = METHODS[name]
    assert cls.name == name and all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))
    assert any(cite in cls.__doc__ for cite in ("Saerens", "arXiv 24"))


@pytest.mark.parametrize(("block", "message"), [
    ({"method": "transclp"}, r"transductive\.method: 'transclp' is not a registered transductive method .*did you "
                             r"mean 'transclip'\?"),
    ({"method": "transclip", "applies_to": "each"}, r"transductive\.applies_to is 'each', expected one of"),
    ({"method": "transclip", "params": {"kk": 3}}, r"unknown key 'kk' in transductive\.params; did you mean 'k'\?"),
    ({"method": "label_propagation", "params": {"alpha": 1.5}}, r"transductive\.params\.alpha must be in \(0, 1\)"),
    ({"method": "ot_assign", "params": {"target": "balanced"}}, r"transductive\.params\.target is 'balanced', expected "
                                                                 r"uniform or em"),
    ({"method": "ot_assign", "params": {"target": [1, 2]}}, r"transductive\.params\.target lists 2 numbers for 6"),
    ({"method": "em_prior", "params": {"max_iter": "many"}}, r"transductive\.params\.max_iter must be int"),
])
def test_a_bad_transductive_block_is_one_error_naming_the_key(make_config, block, message):
    classes = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
    with pytest.raises(ConfigError, match=message):
        make_config(transductive=block, data={"dev": {"path": "/nonexistent"}, "classes": classes})


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, scene_dir, dev_dir, tiny_arch, tiny_checkpoints):
    """The tiny models' predict without the stage, then with each method, sharing one cache (encoded once)."""
    from helpers.config import config_from_dict

    from .conftest import INTEL_CLASS_MAP

    tmp = tmp_path_factory.mktemp("transductive")
    entry = {"backend": "open_clip", "arch": str(tiny_arch), "precision": "fp32"}
    base = {"name": "stage", "data": {"test": str(scene_dir), "dev": {"path": str(dev_dir),
                                                                      "class_map": INTEL_CLASS_MAP}},
            "models": {"a": {**entry, "pretrained": str(tiny_checkpoints[0]), "sharpness": 2.3},
                       "b": {**entry, "pretrained": str(tiny_checkpoints[1]), "sharpness": [1.0, 2.0]}},
            "ensemble": {"weights": {"a": 0.6, "b": 0.4}, "drop_below": 0.002}, "cache_dir": str(tmp / "cache"),
            "num_workers": 0}
    runs = {"off": (predict(config_from_dict(base), tmp / "off", progress=False), tmp / "off")}
    for name, block in [("ot_ensemble", {"method": "ot_assign"}),
                        ("transclip_each", {"method": "transclip", "applies_to": "each_model"}),
                        ("lp_each", {"method": "label_propagation", "applies_to": "each_model", "params": {"k": 4}}),
                        ("em_ensemble", {"method": "em_prior"})]:
        runs[name] = (predict(config_from_dict({**base, "transductive": block}), tmp / name, progress=False),
                      tmp / name)
    return runs


def test_predict_runs_the_stage_and_metrics_say_what_it_changed(stage_runs):
    off_metrics, off_dir = stage_runs["off"]
    assert "transductive" not in off_metrics
    off_labels = read_submission(off_dir / "submission.csv")[1]
    for name, (metrics, folder) in stage_runs.items():
        if name == "off":
            continue
        stage = metrics["transductive"]
        assert json.loads((folder / "metrics.json").read_text())["transductive"] == stage
        assert stage["method"] == {"ot": "ot_assign", "transclip": "transclip", "lp": "label_propagation",
                                   "em": "em_prior"}[name.split("_")[0]]
        assert stage["params"] == dict(METHODS[stage["method"]]().params(), **({"k": 4} if name == "lp_each" else {}))
        labels = read_submission(folder / "submission.csv")[1]
        test = stage["test"]
        assert test["predicted_counts_before"] == off_metrics["test"]["predicted_counts"]  # zero-shot: the run off
        assert test["predicted_counts_after"] == metrics["test"]["predicted_counts"]
        assert sum(test["predicted_counts_after"].values()) == len(labels) == 38
        assert test["labels_moved"] == int((np.asarray(labels) != np.asarray(off_labels)).sum())
        dev = stage["dev"]
        assert dev["zero_shot"]["accuracy"] == off_metrics["dev"]["ensemble"]["accuracy"]
        assert dev["vs_zero_shot"]["delta"] == pytest.approx(metrics["dev"]["ensemble"]["accuracy"]
                                                             - dev["zero_shot"]["accuracy"])
        assert set(test.get("models", {})) == ({"a", "b"} if stage["applies_to"] == "each_model" else set())
    counts = stage_runs["ot_ensemble"][0]["test"]["predicted_counts"]
    assert sorted(counts.values()) == [6, 6, 6, 6, 7, 7]  # 38 images, balanced exactly
    summary = metrics_summary(stage_runs["ot_ensemble"][0])  # what predict prints
    moved = stage_runs["ot_ensemble"][0]["transductive"]["test"]["labels_moved"]
    assert f"  transductive ot_assign (ensemble) moved {moved} labels" in summary
    assert any(line.startswith("  transductive ot_assign (ensemble) moved") and "against zero-shot (McNemar p"
               in line for line in summary)


def test_every_scoring_modes_class_scores_are_probability_mass_the_stage_can_take():
    """The stage reads class scores as probabilities (row-normalised: the argmax kept); a mode whose scores were
    logits would be refused, not silently flattened."""
    from helpers.research.scoring import SCORERS, score
    from helpers.research.transductive import class_probabilities

    rng = np.random.default_rng(0)
    image, text = (rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 6))
    image, text = image / np.linalg.norm(image, axis=1, keepdims=True), text / np.linalg.norm(text, axis=1,
                                                                                                 keepdims=True)
    for mode in SCORERS.names():
        scores = score(mode, image, text, np.array([0, 0, 1, 1, 2, 2]), 3).class_scores.numpy()
        probs = class_probabilities(scores)
        assert np.allclose(probs.sum(axis=1), 1) and np.array_equal(probs.argmax(axis=1), scores.argmax(axis=1))
        assert np.allclose(probs, scores / scores.sum(axis=1, keepdims=True)), mode  # no softmax of probabilities
    with pytest.raises(ValueError, match="class scores that are probabilities"):
        class_probabilities(np.array([[1.5, -0.5]]))
