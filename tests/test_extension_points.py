"""The extension points: backends, preprocessing steps and scoring modes are registries; each registered entry is
tested here by name (timm's way), and a new one is one module and one registration that the config then takes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers.config import ConfigError, ModelEntry, build_step
from helpers.display.nb import model_info
from helpers.infra.cache import image_store
from helpers.infra.files import PROJECT_ROOT
from helpers.models import ModelHandle
from helpers.models.backends import BACKENDS, Backend, register_backend
from helpers.research.scoring import SCORERS, joint_softmax_scores
from helpers.research.steps import CLASSIC_RECIPE, STEPS, Preprocess, Step
from helpers.research.steps.standard import RGB, CenterCrop, Resize, Sharpen
from helpers.runs.pipeline import predict

# --- every registered preprocessing step ------------------------------------------------------------------------


@pytest.mark.parametrize("name", STEPS.names())
def test_every_step_builds_from_its_config_form_and_transforms_an_image(name):
    step = build_step(name, "models.a.preprocess[0]")
    assert type(step) is STEPS[name] and step.name == name
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    # as a run has it: the model's size and the run's estimated blur filled in where the config leaves them out
    step = step.for_model(224).with_blur(2.0)
    assert not step.wants_blur
    out = step(image)
    assert isinstance(out, Image.Image)
    key = step.key()
    assert key["step"] == name and set(key) == {"step", *(f.name for f in dataclasses.fields(step))}


@pytest.mark.parametrize("name", [n for n in STEPS.names() if dataclasses.fields(STEPS[n])])
def test_every_step_parameter_is_in_its_cache_key(name):
    """Each field changes the key: a step's cached embeddings are never reused for other settings."""
    cls = STEPS[name]
    for f in dataclasses.fields(cls):
        a, b = cls(), dataclasses.replace(cls(), **{f.name: 3 if f.type in ("int | None", "int") else 1.5})
        assert a.for_model(224).with_blur(2.0).key() != b.for_model(224).with_blur(2.0).key()


def test_the_sharpness_shorthand_keeps_the_cache_keys_written_before_steps():
    """Folder names computed by main before steps existed (helpers/data.py's Preprocess.key), for this entry: a
    cache written then is still hit."""
    entry = ModelEntry(backend="open_clip", arch="ViT-B-32-quickgelu", pretrained="random", seed=7, precision="fp32",
                       sharpness=[1.0, 2.3])
    handle = ModelHandle("m", entry, "cpu")
    assert [view.key()["recipe"] for view in handle.views] == [CLASSIC_RECIPE] * 2
    assert [image_store("/nonexistent", handle, view).root.name for view in handle.views] == [
        "ViT-B-32-quickgelu-8a42ee3a04ba62d8", "ViT-B-32-quickgelu-1ab4aa1070402278"]
    # the same steps written out are the same view, and the same cache entry
    written = dataclasses.replace(entry, sharpness=1.0, preprocess=[[], [{"sharpen": {"factor": 2.3}}]])
    assert ModelHandle("m", written, "cpu").views == handle.views


def test_other_steps_are_keyed_by_each_step_in_order():
    a = Preprocess(224, (Resize(224), CenterCrop(224), RGB(), Sharpen(2.0)))
    b = Preprocess(224, (Resize(224), CenterCrop(224), Sharpen(2.0), RGB()))
    assert a.key()["recipe"] == CLASSIC_RECIPE
    assert [s["step"] for s in b.key()["steps"]] == ["resize", "center_crop", "sharpen", "rgb"]
    assert b.describe() == "sharpen" and a.describe() == "sharpness 2"


@pytest.mark.parametrize(("preprocess", "message"), [
    ([{"sharpn": {"factor": 2}}], r"models\.a\.preprocess\[0\]: 'sharpn' is not a registered preprocessing step "
                                  r"\(registered: .*\); did you mean 'sharpen'\?"),
    ([{"sharpen": {"factr": 2}}], r"unknown key 'factr' in models\.a\.preprocess\[0\]\.sharpen; did you mean 'factor'"),
    ([{"sharpen": {"factor": 200}}], r"models\.a\.preprocess\[0\]\.sharpen\.factor must be between 0 and 100"),
    ([{"sharpen": {"factor": "x"}}], r"models\.a\.preprocess\[0\]\.sharpen\.factor must be float"),
    ([{"resize": {"size": 256}}, "center_crop"], r"sets the size itself, so it lists every step: add rgb"),
    ([["sharpen"], ["sharpen"]], r"lists the same view twice"),
    ([{"sharpen": {}, "rgb": {}}], r"must name one step"),
])
def test_a_bad_step_is_one_error_naming_the_key(make_config, preprocess, message):
    with pytest.raises(ConfigError, match=message):
        make_config(models={"a": {"backend": "open_clip", "arch": "ViT-B-32", "pretrained": "random",
                                  "preprocess": preprocess}})


def test_sharpness_and_preprocess_together_are_refused(make_config):
    with pytest.raises(ConfigError, match=r"models\.a: give sharpness or preprocess, not both .*factor: 2\.3"):
        make_config(models={"a": {"backend": "open_clip", "arch": "ViT-B-32", "pretrained": "random",
                                  "sharpness": 2.3, "preprocess": ["rgb"]}})


@pytest.fixture
def registered(monkeypatch):
    """Register entries for one test only."""

    def add(registry, name, entry):
        registry.names()  # loaded first, so that the entry is not lost to the registry's first load
        monkeypatch.setitem(registry._entries, name, entry)

    return add


def test_a_new_step_is_one_registration(registered, make_config):
    @dataclasses.dataclass(frozen=True)
    class Invert(Step):
        strength: float = 1.0

        def __call__(self, img):
            return Image.eval(img, lambda v: int(255 - self.strength * v))

    Invert.name = "invert"  # what register_step("invert") sets, for this test only
    registered(STEPS, "invert", Invert)
    config = make_config(models={"a": {"backend": "open_clip", "arch": "ViT-B-32", "pretrained": "random",
                                       "preprocess": ["rgb", {"invert": {"strength": 0.5}}]}}, ensemble={})
    view = ModelHandle("a", config.models["a"], "cpu").views[0]
    assert view.key()["steps"][-1] == {"step": "invert", "strength": 0.5}
    assert view.describe() == "invert"


# --- scoring modes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", SCORERS.names())
def test_every_scorer_declares_what_it_produces(mode):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 8)).astype(np.float32)
    text = rng.normal(size=(6, 8)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    scorer = SCORERS[mode]
    scores = scorer.score(image, text, [0, 0, 1, 1, 2, 2], 3)
    assert scores.class_scores.shape == (5, 3)
    assert (scores.prompt_probs is not None) == scorer.per_prompt_probabilities


def test_a_new_scorer_with_per_prompt_probabilities_takes_drop_below(registered, make_config):
    registered(SCORERS, "joint_softmax_copy", dataclasses.replace(SCORERS["joint_softmax_mean"],
                                                                  name="joint_softmax_copy"))
    config = make_config(scoring="joint_softmax_copy", ensemble={"drop_below": 0.001})
    assert config.scoring == "joint_softmax_copy"
    with pytest.raises(ConfigError, match=r"needs a scoring mode that gives them \(joint_softmax_copy, "
                                          r"joint_softmax_mean\), not prototype"):
        make_config(scoring="prototype", ensemble={"drop_below": 0.001})
    assert SCORERS["joint_softmax_mean"].score is joint_softmax_scores


# --- backends -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_every_backend_checks_its_own_entry_keys(backend):
    cls = BACKENDS[backend]
    entry = ModelEntry(backend=backend, pretrained="/nonexistent", device_map="auto")
    if cls.places_weights:
        cls.check_entry(entry, "models.x")
    else:
        with pytest.raises(ConfigError, match=r"models\.x\.device_map is for backends .* only"):
            cls.check_entry(entry, "models.x")


def test_a_new_backend_is_one_registration(registered, make_config):
    class Toy(Backend):
        @classmethod
        def check_entry(cls, entry, where):
            super().check_entry(entry, where)
            if not entry.pretrained.startswith("toy:"):
                raise ConfigError(f"{where}.pretrained must start with toy:")

    registered(BACKENDS, "toy", Toy)
    config = make_config(models={"a": {"backend": "toy", "pretrained": "toy:1"}}, ensemble={})
    assert config.models["a"].backend == "toy"
    with pytest.raises(ConfigError, match=r"models\.a\.pretrained must start with toy:"):
        make_config(models={"a": {"backend": "toy", "pretrained": "x"}}, ensemble={})
    with pytest.raises(ConfigError, match=r"models\.a\.backend is 'tyo', expected one of .*toy.*; did you mean 'toy'"):
        make_config(models={"a": {"backend": "tyo", "pretrained": "x"}}, ensemble={})


def test_register_backend_is_the_registry(registered):
    assert register_backend("open_clip")(BACKENDS["open_clip"]) is BACKENDS["open_clip"]
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("open_clip")(Backend)


# the libraries a model needs; the config check reads every backend's rules without them
MODEL_LIBRARIES = ("torch", "torchvision", "open_clip", "transformers")


def test_the_config_check_runs_every_backends_rules_without_torch(tmp_path):
    """Every shipped config is checked, and a config that breaks a backend's own rule (a device_map on open_clip) is
    refused by the command with its one error line, in a process that never imports torch or a model library."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom helpers.config import load_config\n"
        "from helpers.__main__ import main\n"
        "for path in sorted(Path('configs').glob('*.yaml')):\n    load_config(path)\n"
        "status = main(['predict', 'configs/demo.yaml', '--set', 'models.eva.device_map=auto'])\n"
        f"print(status, [m for m in {MODEL_LIBRARIES!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          check=True)
    assert done.stderr == ("error: --set models.eva.device_map=auto: models.eva.device_map is for backends eva_clip "
                           "and hf_clip only; open_clip loads the whole model onto the run's device\n")
    assert done.stdout.splitlines()[-1] == "2 []"


# --- a run with steps -------------------------------------------------------------------------------------------


def test_a_run_with_written_steps_reads_the_shorthands_cache(make_config, tmp_path, count_image_batches):
    """`preprocess: [sharpen 2.3]` is `sharpness: 2.3`: the same cache entry, no image encoded again, the same
    submission; a view that orders its own steps is a new entry, encoded once."""
    limited = {"test": make_config().data.test, "limit": 8}
    first = predict(make_config(data=limited), tmp_path / "a", progress=False)
    assert first is not None
    before = count_image_batches["n"]
    base = make_config().models
    written = {"a": {**_raw(base["a"]), "sharpness": 1.0, "preprocess": [{"sharpen": {"factor": 2.3}}]},
               "b": _raw(base["b"])}
    predict(make_config(data=limited, models=written), tmp_path / "b", progress=False)
    assert count_image_batches["n"] == before
    assert (tmp_path / "a" / "submission.csv").read_bytes() == (tmp_path / "b" / "submission.csv").read_bytes()
    reordered = {"a": {**written["a"], "preprocess": [{"resize": {"size": 224}}, "center_crop", "sharpen", "rgb"]},
                 "b": _raw(base["b"])}
    predict(make_config(data=limited, models=reordered), tmp_path / "c", progress=False)
    assert count_image_batches["n"] > before
    # notebook 04's table of what the model recorded names each view, by its sharpness or by its steps
    views = {run: model_info(json.loads((tmp_path / run / "models" / "a" / "model.json").read_text()))
             .set_index("field").loc["views", "value"] for run in "bc"}
    assert views == {"b": "sharpness 2.3 at 224 px", "c": "sharpen at 224 px"}


def _raw(entry: ModelEntry) -> dict:
    return {k: v for k, v in dataclasses.asdict(entry).items() if v is not None}
