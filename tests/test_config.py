"""Run configs: the issue's example loads as written; mistakes are errors that name the file and the key."""

import textwrap

import pytest

from helpers.config import ConfigError, ModelEntry, PromptSpec, config_from_dict, load_config

EXAMPLE = """
name: parity
data:
  test: {test}
  limit: 128
prompts: winner
scoring: joint_softmax_mean
models:
  a: {{backend: open_clip, arch: ViT-B-32-quickgelu, pretrained: /path/a.pt, sharpness: 2.3, precision: fp32}}
  b: {{backend: open_clip, arch: ViT-B-32-quickgelu, pretrained: /path/b.pt, sharpness: 2.0, precision: fp32}}
ensemble:
  weights: {{a: 0.5, b: 0.5}}
  drop_below: 0.002
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def base(**overrides):
    raw = {"name": "x", "data": {"test": "/data/Scene"},
           "models": {"a": {"backend": "open_clip", "arch": "ViT-B-32", "pretrained": "random"}}}
    raw.update(overrides)
    return raw


def test_the_issue_example_loads_as_written(tmp_path):
    config = load_config(write(tmp_path, EXAMPLE.format(test="data/Scene")))
    assert config.name == "parity"
    assert config.data.limit == 128
    assert config.data.test == str((tmp_path.cwd() / "data/Scene").resolve())
    assert config.models["a"] == ModelEntry(backend="open_clip", arch="ViT-B-32-quickgelu", pretrained="/path/a.pt",
                                            sharpness=2.3, precision="fp32")
    assert config.models["b"].sharpness == 2.0
    assert config.ensemble.weights == {"a": 0.5, "b": 0.5} and config.ensemble.drop_below == 0.002
    assert config.logit_scale == 100.0


def test_a_typo_names_the_key_and_suggests_the_right_one(tmp_path):
    path = write(tmp_path, EXAMPLE.format(test="x").replace("sharpness: 2.3", "sharpnes: 2.3"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: unknown key 'sharpnes' in models.a; did you mean 'sharpness'?"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scoring": "joint_softmax"}, "scoring is 'joint_softmax', expected one of"),
        ({"models": {"a": {"backend": "openclip", "arch": "A", "pretrained": "random"}}}, "did you mean 'open_clip'"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A", "pretrained": "random", "precision": "fp8"}}},
         "models.a.precision is 'fp8'"),
        ({"models": {"a": {"backend": "open_clip", "pretrained": "random"}}}, "models.a.arch is required"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A", "pretrained": "random", "sharpness": "high"}}},
         "models.a.sharpness must be float"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A"}}}, "missing required key 'models.a.pretrained'"),
        ({"models": {"e": {"backend": "eva_clip", "pretrained": "BAAI/EVA-CLIP-18B"}}},
         "models.e.revision is required"),
        ({"ensemble": {"weights": {"a": 0.5, "z": 0.5}}}, "ensemble.weights names 'z'"),
        ({"ensemble": {"weights": {"a": 0.7}}}, "must be >= 0 and sum to 1"),
        ({"scoring": "prototype", "ensemble": {"drop_below": 0.002}}, "drop_below acts on per-prompt probabilities"),
        ({"data": {"test": "/x", "limit": 0}}, "data.limit must be at least 1"),
        ({"data": {"tset": "/x"}}, "unknown key 'tset' in data; did you mean 'test'?"),
        ({"prompts": {"set": "winner", "gruops": ["blur"]}}, "did you mean 'groups'"),
        ({"name": None}, "name must be str"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A", "pretrained": "random", "compile": "yes"}}},
         "models.a.compile must be bool"),
    ],
)
def test_invalid_configs_are_rejected_with_the_key_named(change, message):
    with pytest.raises(ConfigError, match="^run.yaml: ") as e:
        config_from_dict(base(**change), source="run.yaml")
    assert message in str(e.value)


def test_prompts_accept_a_name_a_spec_or_a_list():
    assert config_from_dict(base(prompts="winner")).prompts == "winner"
    spec = config_from_dict(base(prompts={"set": "winner", "exclude": ["descriptions"]})).prompts
    assert spec == PromptSpec(set="winner", exclude=["descriptions"])
    both = config_from_dict(base(prompts=[{"set": "winner", "groups": ["name"]}, {"set": "winner"}])).prompts
    assert [s.groups for s in both] == [["name"], None]


def test_missing_or_broken_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed"))


def test_overrides_from_the_command_line_set_dotted_keys(tmp_path):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    config = load_config(path, ["data.limit=8", "models.a.sharpness=1.5", "ensemble.drop_below=null"])
    assert config.data.limit == 8 and config.models["a"].sharpness == 1.5 and config.ensemble.drop_below is None
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(path, ["data.limit"])
    with pytest.raises(ConfigError, match="unknown key 'limt' in data"):
        load_config(path, ["data.limt=3"])
