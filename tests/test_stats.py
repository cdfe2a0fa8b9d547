"""Statistics on cases whose answers are known."""

import numpy as np
import pytest

from helpers.research.stats import (
    accuracy_summary,
    bootstrap_ci,
    confusion_matrix,
    mcnemar_p,
    paired_comparison,
    per_class_accuracy,
)


def test_bootstrap_interval_of_a_constant_is_a_point():
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(50)) == (0.0, 0.0)


def test_bootstrap_interval_matches_the_binomial_width_and_is_seeded():
    correct = np.array([1, 0] * 500)  # p = 0.5, n = 1000: normal half-width 1.96 * sqrt(0.25 / 1000) = 0.031
    lo, hi = bootstrap_ci(correct, n_resamples=4000)
    assert abs(lo - (0.5 - 0.031)) < 0.005 and abs(hi - (0.5 + 0.031)) < 0.005
    assert bootstrap_ci(correct) == bootstrap_ci(correct)
    assert bootstrap_ci(correct, seed=1) != bootstrap_ci(correct, seed=2)


def test_accuracy_summary_and_per_class():
    labels, predictions = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    summary = accuracy_summary(labels, predictions)
    assert summary["accuracy"] == 4 / 6 and summary["images"] == 6
    assert summary["ci95"][0] <= 4 / 6 <= summary["ci95"][1]
    per_class = per_class_accuracy(labels, predictions, ["a", "b", "c"])
    assert [per_class[c]["accuracy"] for c in "abc"] == [0.5, 1.0, 0.5]


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_mcnemar_exact_on_known_counts():
    # 10 images only A gets right, none only B: p = 2 * 0.5^10
    a = np.array([1] * 10 + [1] * 5 + [0] * 5)
    b = np.array([0] * 10 + [1] * 5 + [0] * 5)
    assert abs(mcnemar_p(a, b) - 2 * 0.5**10) < 1e-12
    assert mcnemar_p([1, 0, 1, 0], [0, 1, 0, 1]) == 1.0  # 2 vs 2 discordant
    assert mcnemar_p([1, 1], [1, 1]) == 1.0


def test_mcnemar_is_scipys_exact_binomial_test_for_every_split_of_the_discordant_pairs():
    from scipy.stats import binomtest

    for n in range(1, 61):
        for only_a in range(n + 1):
            a = np.array([1] * only_a + [0] * (n - only_a) + [1, 0])  # and two concordant images
            b = np.array([0] * only_a + [1] * (n - only_a) + [1, 0])
            expected = binomtest(only_a, n, 0.5).pvalue
            assert mcnemar_p(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-300), (only_a, n)


def test_paired_comparison_sees_noise_as_noise_and_a_real_gain_as_real():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 2000)
    base = np.where(rng.random(2000) < 0.9, labels, (labels + 1) % 6)
    same = paired_comparison(labels, base, base)
    assert same == {"delta": 0.0, "delta_ci95": [0.0, 0.0], "mcnemar_p": 1.0, "differs": False}

    flip = base.copy()  # two images changed: +0.1%, like the winner's drop
    wrong = np.flatnonzero(base != labels)[:2]
    flip[wrong] = labels[wrong]
    tiny = paired_comparison(labels, base, flip)
    assert tiny["delta"] == 0.001 and not tiny["differs"] and tiny["delta_ci95"][0] <= 0

    better = base.copy()
    fixed = np.flatnonzero(base != labels)[:60]
    better[fixed] = labels[fixed]
    real = paired_comparison(labels, base, better)
    assert real["differs"] and real["delta_ci95"][0] > 0 and abs(real["delta"] - 0.03) < 1e-12


def test_an_interval_has_one_record_shape_and_one_table_shape():
    """Records and JSON keep `ci95: [low, high]`; a table gets `<name>_ci_low`/`<name>_ci_high` from one function, and
    every report writes the pair as `value [low, high]`."""
    from helpers.research.stats import interval_columns, interval_records, interval_text

    summary = accuracy_summary([0, 1, 1, 0], [0, 1, 0, 0])
    assert interval_columns("accuracy", summary["accuracy"], summary["ci95"]) == {
        "accuracy": 0.75, "accuracy_ci_low": summary["ci95"][0], "accuracy_ci_high": summary["ci95"][1]}
    empty = interval_columns("agreement", float("nan"), None)
    assert list(empty) == ["agreement", "agreement_ci_low", "agreement_ci_high"]
    assert all(v != v for v in empty.values())
    row = {"point": "p", **interval_columns("accuracy", 0.75, (0.5, 1.0)), **empty}
    assert interval_records([row]) == [{"point": "p", "accuracy": 0.75, "accuracy_ci95": [0.5, 1.0],
                                        "agreement": empty["agreement"], "agreement_ci95": None}]
    assert interval_text(0.0833, (0.041, 0.1333)) == "0.083 [0.041, 0.133]"
    assert interval_text(0.02, (-0.01, 0.05), digits=2, signed=True) == "+0.02 [-0.01, +0.05]"
    assert interval_text(float("nan"), None) == "—"
