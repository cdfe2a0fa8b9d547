"""Prompt sets as data, the scoring modes on hand-computed examples, and the ensemble."""

import math

import numpy as np
import pytest
import torch

from helpers.config import ConfigError, PromptSpec
from helpers.research import oracle
from helpers.research.prompts import list_prompt_sets, load_prompts
from helpers.research.scoring import SCORERS, Scores, ensemble_scores, pool_by_class, score

from .conftest import CLASSES


def test_the_winner_set_is_the_winners_312_prompts_in_order():
    prompts = load_prompts("winner", CLASSES)
    assert prompts.texts == oracle.winner_prompts(CLASSES)
    assert prompts.groups == ["name", "basic", "blur", "imagenet41", "descriptions"]
    assert prompts.counts() == dict.fromkeys(CLASSES, 52)
    assert prompts.class_index.tolist() == [c for c in range(6) for _ in range(52)]


def test_sets_compose_by_group():
    only = load_prompts(PromptSpec(set="winner", groups=["blur", "name"]), CLASSES)
    assert only.texts[:5] == ["a blurry photo of a Buildings", "a blurry image of a Buildings",
                              "a blurred photo of a Buildings", "a blurred image of a Buildings", "Buildings"]
    without = load_prompts(PromptSpec(set="winner", exclude=["imagenet41", "descriptions"]), CLASSES)
    assert without.counts() == dict.fromkeys(CLASSES, 8)
    two = load_prompts([PromptSpec(set="winner", groups=["name"]), PromptSpec(set="winner", groups=["descriptions"])],
                       CLASSES)
    assert two.texts[:4] == ["Buildings", "A picture of an urban area with buildings",
                             "An architectural structure in the city", "The Windows"]
    winner = load_prompts("winner", CLASSES)
    assert [winner.texts[i] for i in winner.group_indices(["name"])] == CLASSES


def test_a_prompt_set_file_may_give_classes_different_counts(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("groups:\n  name: ['{c}']\n  extra:\n    Sea: [waves, a beach]\n")
    prompts = load_prompts(str(path), ["Forests", "Sea"])
    assert prompts.texts == ["Forests", "Sea", "waves", "a beach"]
    assert prompts.counts() == {"Forests": 1, "Sea": 3}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("groups:\n  d:\n    Ocean: [water]\n", "names class 'Ocean'"),
        ("groups:\n  t: ['a photo']\n", "has no {c}"),
        ("groups: {}\n", "non-empty 'groups'"),
        ("groups:\n  d:\n    Sea: [water]\n", "class 'Forests' has no prompt"),
    ],
)
def test_bad_prompt_sets_are_named(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_prompts(str(path), ["Forests", "Sea"])


def prompt_set_error(path, classes=("Forests", "Sea"), spec=None) -> str:
    """The one-line message of the ConfigError that loading the prompt set at `path` raises."""
    with pytest.raises(ConfigError) as e:
        load_prompts(spec or str(path), list(classes))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("groups:\n  g: ['a photo of a {class}']\n",
         "template 'a photo of a {class}' in group 'g' has an unknown placeholder {class}; "
         "the class name is written {c}"),
        ("groups:\n  g: ['{c} in {place}']\n",
         "template '{c} in {place}' in group 'g' has an unknown placeholder {place}; the class name is written {c}"),
        ("groups:\n  g: ['a {c!r}']\n",
         "template 'a {c!r}' in group 'g' has an unknown placeholder {c!r}; the class name is written {c}"),
        ("groups:\n  g: ['a {}']\n",
         "template 'a {}' in group 'g' has an unknown placeholder {}; the class name is written {c}"),
        ("groups:\n  g: ['a {c']\n",
         "template 'a {c' in group 'g' has a stray brace (expected '}' before end of string); write {c} for the "
         "class name and {{ or }} for a literal brace"),
        ("groups:\n  g: ['a {c} }']\n",
         "template 'a {c} }' in group 'g' has a stray brace (Single '}' encountered in format string); write {c} "
         "for the class name and {{ or }} for a literal brace"),
        ("groups:\n  g: ['a photo']\n",
         "template 'a photo' in group 'g' has no {c}; literal prompts go in a per-class mapping"),
        ("groups:\n  1: ['{c}']\n", "group name 1 must be text; quote it"),
        ("groups:\n  d:\n    Sea: ['a photo of {c}']\n",
         "literal prompt 'a photo of {c}' for class 'Sea' in group 'd' has a placeholder {c}; literal prompts are "
         "used as written, so put templates in a list group"),
        ("groups:\n  d:\n    Sea: ['waves', 'a {place} by the sea']\n",
         "literal prompt 'a {place} by the sea' for class 'Sea' in group 'd' has a placeholder {place}; literal "
         "prompts are used as written, so put templates in a list group"),
    ],
)
def test_bad_placeholders_are_named_with_the_file_and_group(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    assert prompt_set_error(path) == f"{path}: {message}"


def test_a_doubled_brace_in_a_template_is_a_literal_brace(tmp_path):
    path = tmp_path / "braces.yaml"
    path.write_text("groups:\n  g: ['{{{c}}} photo']\n")
    assert load_prompts(str(path), ["Sea"]).texts == ["{Sea} photo"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("groups:\n  basic: ['a photo of a {c}']\n  extra:\n    Sea: ['a photo of a Sea']\n",
         "prompts: 'a photo of a Sea' appears twice (class Sea, groups basic and extra); remove one"),
        ("groups:\n  g: ['{c}', '{c}']\n", "prompts: 'Forests' appears twice (class Forests, group g); remove one"),
        ("groups:\n  name: ['{c}']\n  d:\n    Forests: [water]\n    Sea: [water]\n",
         "prompts: 'water' is a prompt of two classes (Forests and Sea, group d), so it cannot tell them apart; "
         "remove one"),
    ],
)
def test_duplicate_prompts_are_named(tmp_path, body, message):
    path = tmp_path / "dup.yaml"
    path.write_text(body)
    assert prompt_set_error(path) == message


def test_composed_sets_that_repeat_a_prompt_are_rejected():
    spec = [PromptSpec(set="winner", groups=["name"]), PromptSpec(set="winner", groups=["name", "blur"])]
    assert prompt_set_error(None, CLASSES, spec) == ("prompts: 'Buildings' appears twice (class Buildings, group "
                                                     "name); remove one")


def test_unreadable_prompt_set_files_are_named(tmp_path):
    folder = tmp_path / "set.yaml"
    folder.mkdir()
    assert prompt_set_error(folder) == f"{folder}: is a folder, expected a prompt-set YAML file"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00g")
    assert prompt_set_error(binary) == (f"{binary}: not UTF-8 text (byte 0xff at offset 0); give a prompt-set YAML "
                                        "file, saved as UTF-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text("groups:\n  g: ['{c}'\n")
    assert prompt_set_error(broken).startswith(f"{broken}: not valid YAML: ")
    assert prompt_set_error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such prompt-set file"


def test_unknown_sets_and_groups_are_named():
    assert "winner" in list_prompt_sets()
    with pytest.raises(ConfigError, match="no built-in prompt set 'winer'"):
        load_prompts("winer", CLASSES)
    with pytest.raises(ConfigError, match="has no group 'blurr'"):
        load_prompts(PromptSpec(groups=["blurr"]), CLASSES)


# Two classes with unequal prompt counts: class 0 has prompt p0, class 1 has p1 and p2 (2-D embeddings).
IMAGE = np.array([[1.0, 0.0]], dtype=np.float32)
TEXT = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
CLASS_INDEX = np.array([0, 1, 1])
E = math.e


def test_joint_softmax_mean_pools_each_class_over_its_own_prompts():
    # logits (scale 1) = [1, 0, 1]; softmax over all three = [e, 1, e] / (2e + 1)
    s = score("joint_softmax_mean", IMAGE, TEXT, CLASS_INDEX, 2, logit_scale=1.0)
    z = 2 * E + 1
    np.testing.assert_allclose(s.prompt_probs.numpy(), [[E / z, 1 / z, E / z]], rtol=1e-6)
    # class means: [e/z, (1+e)/(2z)] = [0.4223, 0.2887]; a sum would have picked class 1 (0.5777)
    np.testing.assert_allclose(s.class_scores.numpy(), [[E / z, (1 + E) / (2 * z)]], rtol=1e-6)
    assert s.labels.tolist() == [0]


def test_prototype_averages_normalised_text_embeddings():
    # prototypes: [1, 0] and normalise([0.5, 0.5]) = [0.7071, 0.7071]; logits [1, 0.7071]
    s = score("prototype", IMAGE, TEXT, CLASS_INDEX, 2, logit_scale=1.0)
    p0 = 1 / (1 + math.exp(math.sqrt(0.5) - 1))
    np.testing.assert_allclose(s.class_scores.numpy(), [[p0, 1 - p0]], rtol=1e-6)
    assert s.prompt_probs is None


def test_mean_logit_averages_logits_then_softmax():
    # class mean logits [1, 0.5] at scale 1; at scale 100 [100, 50]
    s = score("mean_logit", IMAGE, TEXT, CLASS_INDEX, 2, logit_scale=1.0)
    np.testing.assert_allclose(s.class_scores.numpy(), [[1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))]],
                               rtol=1e-6)
    s100 = score("mean_logit", IMAGE, TEXT, CLASS_INDEX, 2)
    np.testing.assert_allclose(s100.class_scores.numpy(), [[1 / (1 + math.exp(-50)), 1 / (1 + math.exp(50))]],
                               rtol=1e-6)


def test_logit_scale_defaults_to_100():
    s = score("joint_softmax_mean", IMAGE, TEXT, CLASS_INDEX, 2)
    z = 2 * math.exp(100) + 1
    np.testing.assert_allclose(s.prompt_probs.numpy(), [[math.exp(100) / z, 1 / z, math.exp(100) / z]], rtol=1e-6,
                               atol=1e-40)
    assert 0 < s.prompt_probs[0, 1] < 1e-40


def test_every_registered_mode_scores_the_winner_shapes():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 8)).astype(np.float32)
    txt = rng.normal(size=(12, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    idx = np.repeat(np.arange(3), 4)
    for mode in SCORERS:
        s = score(mode, img, txt, idx, 3)
        assert s.class_scores.shape == (5, 3) and s.labels.shape == (5,)


def test_pooling_never_reshapes():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    pooled = pool_by_class(scores, np.array([1, 0, 1, 1, 0]), 2)
    # class 0 holds columns 1 and 4 (2, 5); class 1 holds columns 0, 2, 3 (1, 3, 4)
    np.testing.assert_allclose(pooled.numpy(), [[3.5, 8 / 3]], rtol=1e-6)


def test_ensemble_weights_the_per_prompt_probabilities_then_drops_then_pools():
    a = Scores(torch.zeros(1, 2), torch.tensor([[0.001, 0.5, 0.499]]))
    b = Scores(torch.zeros(1, 2), torch.tensor([[0.003, 0.001, 0.996]]))
    idx = np.array([0, 1, 1])
    plain = ensemble_scores({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, idx, 2)
    np.testing.assert_allclose(plain.prompt_probs.numpy(), [[0.002, 0.2505, 0.7475]], rtol=1e-6)
    dropped = ensemble_scores({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, idx, 2, drop_below=0.002)
    np.testing.assert_allclose(dropped.prompt_probs.numpy(), [[0.0, 0.2505, 0.7475]], rtol=1e-6)
    np.testing.assert_allclose(dropped.class_scores.numpy(), [[0.0, 0.499]], rtol=1e-6)
    only_b = ensemble_scores({"a": a, "b": b}, {"a": 0.0, "b": 1.0}, idx, 2)
    assert torch.equal(only_b.prompt_probs, b.prompt_probs)


def test_ensemble_of_class_scores_for_modes_without_prompt_probabilities():
    a, b = Scores(torch.tensor([[0.9, 0.1]])), Scores(torch.tensor([[0.2, 0.8]]))
    combined = ensemble_scores({"a": a, "b": b}, {"a": 0.25, "b": 0.75}, np.array([0, 1]), 2)
    np.testing.assert_allclose(combined.class_scores.numpy(), [[0.375, 0.625]])
    with pytest.raises(ValueError, match="drop_below needs per-prompt"):
        ensemble_scores({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, np.array([0, 1]), 2, drop_below=0.002)
