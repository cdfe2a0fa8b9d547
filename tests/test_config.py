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


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
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
        ({"data": {"test": "/x", "limit": 0}}, "data.limit must be at least 1, got 0"),
        ({"data": {"tset": "/x"}}, "unknown key 'tset' in data; did you mean 'test'?"),
        ({"prompts": {"set": "winner", "gruops": ["blur"]}}, "did you mean 'groups'"),
        ({"name": None}, "name must be str"),
        ({"num_workers": -1}, "num_workers must be between 0 and 256 (or absent: the device's default), got -1"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A", "pretrained": "random", "compile": "yes"}}},
         "models.a.compile is 'yes', expected one of default, reduce-overhead, max-autotune"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A", "pretrained": "random", "compile": 1}}},
         "models.a.compile must be bool"),
        ({"models": {"a": {"backend": "open_clip", "arch": "A", "pretrained": "random", "precision": "fp8"}}},
         "models.a.precision is 'fp8', expected one of auto, fp32, fp16, bf16"),
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
    with pytest.raises(ConfigError, match="no such run config file"):
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


def rejected(path, *overrides) -> str:
    """The one-line message of the ConfigError that loading `path` with `overrides` raises."""
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logit_scale=.inf", "logit_scale must be a finite number, got inf"),
        ("logit_scale=.nan", "logit_scale must be a finite number, got nan"),
        ("models.a.sharpness=.nan", "models.a.sharpness must be a finite number, got nan"),
        ("models.a.sharpness=[2.0, -.inf]", "models.a.sharpness[1] must be a finite number, got -inf"),
        ("models.a.mean=[.nan, 0.5, 0.5]", "models.a.mean[0] must be a finite number, got nan"),
        ("models.a.std=[0.5, .inf, 0.5]", "models.a.std[1] must be a finite number, got inf"),
        ("ensemble.weights={a: .nan, b: .nan}", "ensemble.weights.a must be a finite number, got nan"),
        ("ensemble.drop_below=.nan", "ensemble.drop_below must be a finite number, got nan"),
        ("analysis.sharpness_grid=[1.0, [2.0, .nan]]",
         "analysis.sharpness_grid[1][1] must be a finite number, got nan"),
        ("analysis.weight_grid=[0.5, .nan]", "analysis.weight_grid[1] must be a finite number, got nan"),
        ("analysis.drop_thresholds=[-.inf]", "analysis.drop_thresholds[0] must be a finite number, got -inf"),
        (f"logit_scale={10**400}", f"logit_scale must be a finite number, got {10**400}"),
    ],
)
def test_non_finite_numbers_are_rejected_with_the_key_named(tmp_path, override, message):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    assert rejected(path, override) == f"--set {override}: {message}"  # the override, not the file, is wrong


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("models.a.batch_size=1000000000000", "models.a.batch_size must be between 1 and 65536, got 1000000000000"),
        ("models.a.batch_size=0", "models.a.batch_size must be between 1 and 65536, got 0"),
        ("num_workers=100000", "num_workers must be between 0 and 256 (or absent: the device's default), got 100000"),
        ("models.a.seed=-1", "models.a.seed must be between 0 and 4294967295, got -1"),
        (f"models.a.seed={2**64}", f"models.a.seed must be between 0 and 4294967295, got {2**64}"),
        ("models.a.sharpness=1000", "models.a.sharpness must be between 0 and 100, got 1000.0"),
        ("models.a.sharpness=[2.0, -1]", "models.a.sharpness[1] must be between 0 and 100, got -1.0"),
        ("models.a.sharpness=[2.0, 2.0]",
         "models.a.sharpness must be a factor or a non-empty list of distinct factors, got [2.0, 2.0]"),
        ("logit_scale=0", "logit_scale must be in (0, 1000] (CLIP's own is 100), got 0.0"),
        ("logit_scale=1.0e+5", "logit_scale must be in (0, 1000] (CLIP's own is 100), got 100000.0"),
        ("analysis.inspect_images=10001", "analysis.inspect_images must be between 0 and 10000, got 10001"),
        (f"data.limit={2**63}", f"data.limit must be at least 1, got {2**63}"),
        ("data.dev={path: d, limit: 0}", "data.dev.limit must be at least 1, got 0"),
        ("models.a.mean=[0.5, 0.5, 0.5]", "models.a: mean and std go together, three numbers each"),
        ("models.a={backend: open_clip, arch: A, pretrained: random, mean: [0.5, 0.5, 0.5], std: [0.5, 0, 0.5]}",
         "models.a.std must be three numbers > 0 (pixels are divided by them), got [0.5, 0.0, 0.5]"),
        ("analysis.weight_grid=[0.5, 1.5]", "analysis.weight_grid[1] must be between 0 and 1, got 1.5"),
        ("analysis.drop_thresholds=[0.002, 1]", "analysis.drop_thresholds[1] must be in [0, 1), got 1.0"),
        ("analysis.sharpness_grid=[1.0, [2.0, 200]]",
         "analysis.sharpness_grid[1][1] must be between 0 and 100, got 200.0"),
        ("analysis.sharpness_grid=[[]]",
         "analysis.sharpness_grid[0] must be a factor or a non-empty list of distinct factors, got []"),
        ("data.classes=[Forests, Sea, Forests]", "data.classes lists 'Forests' 2 times; list each class once"),
        ("data.classes=[Forests, '  ']", "data.classes[1] is an empty name; give every class a name"),
    ],
)
def test_numbers_out_of_range_and_bad_class_lists_are_rejected(tmp_path, override, message):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    assert rejected(path, override) == f"--set {override}: {message}"


def test_an_error_names_the_override_it_comes_from_else_the_file(tmp_path):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    good, typo = "models.a.batch_size=16", "models.a.sharpnes=2.0"
    assert rejected(path, good, typo) == (f"--set {typo}: unknown key 'sharpnes' in models.a; did you mean "
                                          "'sharpness'?")  # the good override is not blamed
    broken = write(tmp_path, EXAMPLE.format(test="x").replace("sharpness:", "sharpnes:", 1), "broken.yaml")
    assert rejected(broken, good) == f"{broken}: unknown key 'sharpnes' in models.a; did you mean 'sharpness'?"


def test_the_largest_accepted_numbers_load(tmp_path):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    config = load_config(path, ["models.a.batch_size=65536", f"models.a.seed={2**32 - 1}", "logit_scale=1000",
                                "num_workers=256", f"data.limit={2**63 - 1}", "models.a.sharpness=[0, 100]"])
    assert config.models["a"].batch_size == 65536 and config.data.limit == 2**63 - 1


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    assert rejected(folder) == f"{folder}: is a folder, expected a run config YAML file"
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"name: x\n\x89PNG\x00\xff")
    assert rejected(binary) == (f"{binary}: not UTF-8 text (byte 0x89 at offset 8); give a run config YAML file, "
                                "saved as UTF-8")
    broken = write(tmp_path, "name: x\ndata: {test: [x}\n")
    assert rejected(broken).startswith(f"{broken}: not valid YAML: ") and "at line 2, column" in rejected(broken)
    bad_date = write(tmp_path, "name: 2024-13-01\n")
    assert rejected(bad_date) == f"{bad_date}: not valid YAML: month must be in 1..12"


@pytest.mark.parametrize(("text", "found"), [("- a\n- b\n", "a list"), ("", "nothing (the file is empty)"),
                                             ("just text\n", "a str")])
def test_a_config_whose_top_level_is_not_a_mapping_is_named(tmp_path, text, found):
    path = write(tmp_path, text)
    expected = f"{path}: the top level must be a mapping of keys (name, data, models, ...), got {found}"
    assert rejected(path) == expected
    assert rejected(path, "data.limit=3") == expected


def test_an_override_that_is_not_yaml_names_the_override(tmp_path):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    assert rejected(path, "data.limit=[") == ("override 'data.limit=[': the value is not valid YAML (expected the "
                                              "node content, but found '<stream end>' at line 1, column 2); quote "
                                              "it if it is text")
    assert rejected(path, "models.a=3", "models.a.seed=1") == "override 'models.a.seed=1': 'a' is not a mapping"


def hf(**fields):
    """A config whose one model is an hf_clip entry with `fields`."""
    return base(models={"h": {"backend": "hf_clip", "pretrained": "/models/clip", **fields}})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_map": "autoo"}, "models.h.device_map is 'autoo', expected one of auto, balanced, balanced_low_0, "
                                  "sequential or a device (cpu, cuda, cuda:N); did you mean 'auto'?"),
        ({"device_map": "cuda:x"}, "models.h.device_map is 'cuda:x', expected one of"),
        ({"device_map": "gpu"}, "models.h.device_map is 'gpu', expected one of"),
        ({"max_memory": {"0": "70GiB"}}, "models.h.max_memory caps what each device takes when the model is spread: "
                                         "it needs device_map auto, balanced, balanced_low_0, sequential, not no "
                                         "device_map"),
        ({"device_map": "cuda:1", "max_memory": {"cpu": "1GiB"}}, "not device_map 'cuda:1' (one device)"),
        ({"device_map": "auto", "max_memory": {"gpu0": "70GiB"}},
         "models.h.max_memory has key 'gpu0', expected GPU indices (0, 1, ...), cpu or disk"),
        ({"device_map": "auto", "max_memory": {0: "70G"}},
         "models.h.max_memory.0 is '70G', expected a size like 70GiB or 500MB (units GiB, MiB, KiB, GB, MB, KB)"),
        ({"device_map": "auto", "max_memory": {"cpu": "lots GiB"}}, "models.h.max_memory.cpu is 'lots GiB'"),
        ({"device_map": "auto", "max_memory": {"cpu": "1.2.3GB"}}, "models.h.max_memory.cpu is '1.2.3GB'"),
        ({"device_map": "auto", "max_memory": {0: "1GiB", "00": "2GiB"}}, "models.h.max_memory names device 0 twice"),
        ({"device_map": "auto", "max_memory": {}}, "models.h.max_memory is empty"),
        ({"device_map": "auto", "max_memory": {"cpu": 100}}, "models.h.max_memory.cpu must be str, got 100"),
        ({"device_map": "auto", "max_memory": {True: "1GiB"}}, "models.h.max_memory key"),
        ({"device_map": ["cuda:0"]}, "models.h.device_map must be str"),
    ],
)
def test_device_map_and_max_memory_mistakes_are_named(fields, message):
    with pytest.raises(ConfigError, match="^run.yaml: ") as e:
        config_from_dict(hf(**fields), source="run.yaml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["device_map", "max_memory"])
def test_device_map_and_max_memory_are_not_for_open_clip(key):
    fields = {"device_map": "auto", "max_memory": {"cpu": "1GiB"}} if key == "max_memory" else {"device_map": "auto"}
    model = {"backend": "open_clip", "arch": "A", "pretrained": "random", **fields}
    with pytest.raises(ConfigError) as e:
        config_from_dict(base(models={"a": model}), source="run.yaml")
    assert str(e.value) == ("run.yaml: models.a.device_map is for backends eva_clip and hf_clip only; open_clip "
                            "loads the whole model onto the run's device")
    if key == "max_memory":
        del model["device_map"]
        with pytest.raises(ConfigError, match=r"models\.a\.max_memory is for backends eva_clip and hf_clip only"):
            config_from_dict(base(models={"a": model}))


@pytest.mark.parametrize("device_map", ["auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda", "cuda:1"])
def test_device_maps_that_load(device_map):
    assert config_from_dict(hf(device_map=device_map)).models["h"].device_map == device_map


def test_max_memory_keys_are_stored_as_strings(tmp_path):
    path = write(tmp_path, EXAMPLE.format(test="x"))
    config = load_config(path, ["models.e={backend: eva_clip, pretrained: /models/eva, device_map: balanced, "
                                "max_memory: {0: 70GiB, 1: 70.5GiB, cpu: 100GB, disk: 500MB}}",
                                "ensemble.weights={a: 0.4, b: 0.4, e: 0.2}"])
    assert config.models["e"].max_memory == {"0": "70GiB", "1": "70.5GiB", "cpu": "100GB", "disk": "500MB"}
    assert config.models["a"].max_memory is None and config.models["a"].device_map is None
