"""Fixtures: small copies of the real images in ../shared/data, and tiny randomly initialised models saved to
local files, so that every loading path runs for real without a network."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Under pytest-xdist (`make test`) the workers share the cores: one thread each, and the same in the processes they
# start (a notebook's kernel, torchrun's ranks), whose numbers the tests compare with their own. Set before torch
# reads it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.config import config_from_dict
from helpers.infra.cache import image_store
from helpers.models import Encoder, ModelHandle, device
from helpers.research.data import file_digest, load_test_set
from helpers.runs.notebooks import import_nbformat
from helpers.runs.pipeline import predict

# the test modules import nbformat: without jsonschema's IRI grammar, as the workbench imports it (a second and more
# in each worker otherwise)
import_nbformat()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("WORKBENCH_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
SCENE = SHARED_DATA / "scene" / "Scene"
INTEL = SHARED_DATA / "intel_test"
CLASSES = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
INTEL_CLASS_MAP = {"buildings": "Buildings", "forest": "Forests", "glacier": "Glacier", "mountain": "Mountains",
                   "sea": "Sea", "street": "Street"}
# the first ids in natural order, and two of the 20 wider images (squashed to 224x224 by the preprocessing)
SCENE_IDS = list(range(36)) + [148, 247]

TINY_ARCH = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True, scope="session")
def precision_auto_is_fp32():
    """`precision: auto` is fp32 in the tests on every machine, as on a CPU without native bf16: their expected
    numbers are fp32's, and the machines tests run on differ (tests of `auto` itself set what the CPU can do).
    Session-wide, so that module-scoped fixtures see it too; a config that a subprocess runs (a notebook, torchrun)
    names its precision where the test compares the outputs with its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device, "cpu_computes_bf16_natively", lambda: False)
        yield


@pytest.fixture(autouse=True, scope="session")
def kernels_forked():
    """The notebooks' kernels of the runs the tests start in their own process are forked from a server that imported
    the workbench once (tests/forked.py): a fresh interpreter spends seconds importing torch and open_clip, in each of
    some forty kernels. The kernels of the runs other processes start are started as usual."""
    from jupyter_client.provisioning import local_provisioner

    from . import forked

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_provisioner, "launch_kernel", forked.launch_kernel)
        yield


@pytest.fixture(autouse=True)
def run_index(tmp_path, monkeypatch) -> Path:
    """Runs in tests record their history in the test's own folder, not in the project's outputs/runs/index.csv."""
    path = tmp_path / "runs-index.csv"
    monkeypatch.setenv("HELPERS_RUN_INDEX", str(path))
    return path


@pytest.fixture
def deny_reading(monkeypatch):
    """Makes Path.read_bytes of the paths given fail with PermissionError. The tests run as root, whom chmod does
    not stop, so this is how they meet a file its user cannot read."""
    denied: set[Path] = set()
    read_bytes = Path.read_bytes

    def read(path):
        if path in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read)
    return denied.add


def require_shared(path: Path) -> Path:
    """Real data is required in CI (a missing folder fails there); elsewhere its absence skips the test."""
    if not path.exists():
        message = f"{path} is missing: the real images of ../shared/data are needed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory) -> Path:
    """A challenge-layout folder (Scene/0/<id>.jpg + classes.json) with real challenge images."""
    src = require_shared(SCENE)
    root = tmp_path_factory.mktemp("scene") / "Scene"
    (root / "0").mkdir(parents=True)
    for i in SCENE_IDS:
        shutil.copy(src / "0" / f"{i}.jpg", root / "0" / f"{i}.jpg")
    shutil.copy(src / "classes.json", root / "classes.json")
    return root


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory) -> Path:
    """A labeled ImageFolder with 4 real Intel photos per class (folder names as in the Intel set)."""
    src = require_shared(INTEL)
    root = tmp_path_factory.mktemp("dev") / "intel"
    for folder in INTEL_CLASS_MAP:
        (root / folder).mkdir(parents=True)
        for p in sorted((src / folder).iterdir())[:4]:
            shutil.copy(p, root / folder / p.name)
    return root


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("arch") / "tiny-quickgelu.json"
    path.write_text(json.dumps(TINY_ARCH))
    return path


def save_open_clip_checkpoint(arch_file: Path, seed: int, path: Path) -> Path:
    import open_clip

    open_clip.add_model_config(arch_file)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch_file.stem)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_arch) -> tuple[Path, Path]:
    """Two randomly initialised open_clip checkpoints of the tiny architecture, standing in for the two models."""
    folder = tmp_path_factory.mktemp("ckpt")
    return (save_open_clip_checkpoint(tiny_arch, 1, folder / "a.pt"),
            save_open_clip_checkpoint(tiny_arch, 2, folder / "b.pt"))


@pytest.fixture
def make_config(tmp_path, scene_dir, tiny_arch, tiny_checkpoints):
    """A run config like the issue's example, on the tiny checkpoints; keyword arguments override top-level keys."""

    def make(**overrides):
        a, b = tiny_checkpoints
        raw = {
            "name": "test",
            "data": {"test": str(scene_dir)},
            "prompts": "winner",
            "scoring": "joint_softmax_mean",
            "models": {
                # fp32 on every machine (precision auto is bf16 on some CPUs): the parity tests compare with the
                # winner's fp32 numbers
                "a": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(a), "sharpness": 2.3,
                      "precision": "fp32"},
                "b": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(b), "sharpness": 2.0,
                      "precision": "fp32"},
            },
            "ensemble": {"weights": {"a": 0.5, "b": 0.5}, "drop_below": None},
            "cache_dir": str(tmp_path / "cache"),
            "num_workers": 0,
        }
        raw.update(overrides)
        return config_from_dict(raw)

    return make


class Interrupt(Exception):
    pass


@pytest.fixture
def count_image_batches(monkeypatch):
    """Counts (and optionally interrupts) calls of the image encoder of every backend."""
    calls = {"n": 0, "fail_after": None}
    original = Encoder.encode_images

    def counted(self, pixels):
        if calls["fail_after"] is not None and calls["n"] >= calls["fail_after"]:
            raise Interrupt("stopped part-way")
        calls["n"] += 1
        return original(self, pixels)

    monkeypatch.setattr(Encoder, "encode_images", counted)
    return calls


# --- runs with faults injected (tests/fault_injection.py), and what they are compared with

FAULT_SCRIPT = PROJECT_ROOT / "tests" / "fault_injection.py"


def fault_config(scene_dir, tiny_arch, tiny_checkpoints, cache: Path, sharpness_b: float = 2.0, **overrides):
    a, b = tiny_checkpoints
    # fp32 named: the subprocesses these configs run in resolve `auto` for their machine (no conftest there), and
    # the test compares their cache with its own
    entry = {"backend": "open_clip", "arch": str(tiny_arch), "batch_size": 8, "precision": "fp32"}
    raw = {"name": "faults", "data": {"test": str(scene_dir)}, "num_workers": 0, "cache_dir": str(cache),
           "models": {"a": {**entry, "pretrained": str(a), "sharpness": 2.3},
                      "b": {**entry, "pretrained": str(b), "sharpness": sharpness_b}},
           "ensemble": {"weights": {"a": 0.5, "b": 0.5}, "drop_below": 0.002}, **overrides}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def clean_submission(tmp_path_factory, scene_dir, tiny_arch, tiny_checkpoints):
    """What an uninterrupted run writes, from a cache of its own."""
    tmp = tmp_path_factory.mktemp("clean")
    predict(fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp / "cache"), tmp / "out", progress=False)
    return (tmp / "out" / "submission.csv").read_bytes()


def missing_batches(config) -> int:
    """The batches a rerun must encode: those with an image that the cache lacks."""
    files = load_test_set(config.data.test).files
    digests = [file_digest(p) for p in files]
    n = 0
    for name, entry in config.models.items():
        handle = ModelHandle(name, entry, "cpu")
        for view in handle.views:
            store = image_store(config.cache_dir, handle, view)
            n += sum(any(d not in store for d in digests[s:s + entry.batch_size])
                     for s in range(0, len(digests), entry.batch_size))
    return n


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm cluster on this machine (tests/slurm_cluster.py: munged, slurmctld and slurmd started from
    a folder of their own, stopped by their pids at the end), its slurm.conf in SLURM_CONF for the session. Under
    CI=true a cluster that cannot start fails the tests; elsewhere they skip, saying why."""
    from .slurm_cluster import ClusterUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the single-node Slurm cluster did not start: {e}")
        pytest.skip(f"no Slurm cluster here: {e}")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        cluster.stop()


# The modules that take longest, first: `make test`'s workers take a module at a time, so they then finish together
# instead of one waiting for the other's last long module.
SLOWEST_MODULES = ("test_slurm.py", "test_notebooks.py", "test_sweep.py", "test_distributed.py", "test_fast_paths.py",
                   "test_reliability.py", "test_notebook_alone.py", "test_notebook_configs.py", "test_bench.py",
                   "test_lab.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# --- EVA-CLIP's own remote code at tiny sizes (tests/fixtures/eva_clip.py): built once per session


@pytest.fixture(scope="session")
def remote_code_modules(tmp_path_factory):
    """transformers copies remote code into its modules cache before importing it: here a folder of the session's
    (for the processes a test starts, `hub_offline` names it in the environment)."""
    from transformers import dynamic_module_utils

    folder = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", folder)
        yield folder


@pytest.fixture(scope="session")
def eva_clip_dir(tmp_path_factory, remote_code_modules) -> Path:
    """A local folder of a tiny EVA-CLIP of the real remote code (seed 0), its weights in model.safetensors."""
    from .fixtures.eva_clip import REFERENCE, build_safetensors_folder, tiny_config

    require_shared(REFERENCE)
    return build_safetensors_folder(tmp_path_factory.mktemp("eva_clip") / "EVA-CLIP-tiny", tiny_config(), seed=0)


@pytest.fixture(scope="session")
def eva_clip_hub_cache(tmp_path_factory, remote_code_modules) -> Path:
    """A hub cache that holds BAAI/EVA-CLIP-18B at the winner's revision: the same tiny model as eva_clip_dir, as the
    repository holds it (fp32 .bin shards and their index, remote code, config.json, tokenizer files)."""
    from .fixtures.eva_clip import REFERENCE, REPO, REVISION, build_sharded_bin_folder, tiny_config
    from .fixtures.hub_cache import write_snapshot

    require_shared(REFERENCE)
    tmp = tmp_path_factory.mktemp("eva_clip_hub")
    repository = build_sharded_bin_folder(tmp / "repository", tiny_config(), seed=0, max_shard_size="4MB")
    write_snapshot(tmp / "hub", REPO, REVISION, {p.name: p for p in sorted(repository.iterdir())})
    return tmp / "hub"


@pytest.fixture
def hub_offline(monkeypatch, eva_clip_hub_cache, remote_code_modules) -> Path:
    """The hub offline (HF_HUB_OFFLINE=1, as read at import by huggingface_hub and transformers too) and its cache
    the one that holds the tiny BAAI/EVA-CLIP-18B (returned); the session's modules cache for the processes the test
    starts. Set for the test alone: a kernel forked from the tests' fork server must agree with it in these."""
    from huggingface_hub import constants
    from transformers.utils import hub

    from helpers import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(eva_clip_hub_cache))
    monkeypatch.setenv("HF_MODULES_CACHE", remote_code_modules)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(eva_clip_hub_cache))
    monkeypatch.setattr(hub, "_is_offline_mode", True)
    monkeypatch.setattr(hub, "TRANSFORMERS_CACHE", str(eva_clip_hub_cache))
    monkeypatch.setattr(models.checkpoints, "_reachable", {})
    return eva_clip_hub_cache


# --- the winner's CUDA autocast, on the CPU (tests/test_fp16_arithmetic.py)

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _float32_like_cuda(op):
    """An AutocastCPU kernel with CUDA autocast's `fp32_set_opt_dtype` policy: low-precision inputs are reduced in,
    and give, float32."""
    def kernel(x, *args, dtype=None, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            return op(x, *args, dtype=torch.float32 if dtype is None and x.dtype in LOW_PRECISION else dtype,
                      **kwargs)
    return kernel


@pytest.fixture
def cuda_autocast_on_cpu(monkeypatch):
    """The winner's `torch.cuda.amp.autocast()` and the workbench's `autocast: true` both autocast to fp16 on the
    CPU, with CUDA's policy for `x.norm(...)` (linalg_vector_norm) and `softmax`."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("linalg_vector_norm", _float32_like_cuda(torch.ops.aten.linalg_vector_norm.default), "AutocastCPU")
    library.impl("softmax.int", _float32_like_cuda(torch.ops.aten.softmax.int), "AutocastCPU")
    monkeypatch.setattr(device, "AUTOCAST_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda.amp, "autocast", lambda: torch.autocast("cpu", dtype=torch.float16))
    yield
    library._destroy()
