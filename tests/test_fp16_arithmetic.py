"""The winner's arithmetic under CUDA autocast, reproduced exactly, checked on the CPU (issue 11, item 1).

Under the winner's `torch.cuda.amp.autocast()` its features are fp16, normalised by an in-place division by a float32
norm (so rounded back to fp16), and its logits come from an fp16 matmul, rounded to fp16 before a float32 softmax.
torch computes fp16 on the CPU too: here CPU autocast to fp16 stands in for CUDA's, given CUDA's float32 policy for
the two ops of the loop where the two autocasts differ (the norm and the softmax), and the literal loop runs under it.
On a GPU, `checks/gpu_parity.py` checks the same against the real CUDA autocast.
"""

import json
import runpy

import numpy as np
import open_clip
import torch

from helpers.models import ModelHandle
from helpers.research import oracle
from helpers.research.scoring import FLOAT32, LogitArithmetic, joint_softmax_probs, scaled_logits
from helpers.runs.outputs import PROJECT_ROOT, read_submission
from helpers.runs.pipeline import predict

from .conftest import CLASSES, SCENE_IDS


def _loop_probs(scene_dir, tiny_arch, tiny_checkpoints) -> list[np.ndarray]:
    """The literal loop's per-prompt probabilities for both tiny models (sharpening 2.3 and 2.0)."""
    open_clip.add_model_config(tiny_arch)
    out = []
    for checkpoint, sharpness in zip(tiny_checkpoints, (2.3, 2.0)):
        model = open_clip.create_model(tiny_arch.stem, pretrained=str(checkpoint))
        out.append(torch.stack(oracle.open_clip_probs(model, open_clip.tokenizer, oracle.winner_prompts(CLASSES),
                                                      str(scene_dir.parent), scene_dir.name,
                                                      oracle.make_processor(sharpness), num_workers=0)).numpy())
    return out


def _autocast_config(make_config, tiny_arch, tiny_checkpoints, **settings):
    """The tiny models with the winner's settings: fp32 weights under autocast, batch 32."""
    settings = {"precision": "fp32", "autocast": True, "batch_size": 32, **settings}
    return make_config(models={
        name: {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(checkpoint), "sharpness": sharpness,
               **settings}
        for name, checkpoint, sharpness in zip("ab", tiny_checkpoints, (2.3, 2.0))})


def _fp16_exact(values: np.ndarray) -> bool:
    return np.array_equal(values, values.astype(np.float16).astype(np.float32))


def test_predict_reproduces_the_loop_under_fp16_autocast_exactly(make_config, scene_dir, tiny_arch, tiny_checkpoints,
                                                                  tmp_path, cuda_autocast_on_cpu):
    assert len(SCENE_IDS) > 32, "the last scoring block should be a partial one, as the winner's last batch was"
    loop = _loop_probs(scene_dir, tiny_arch, tiny_checkpoints)
    predict(_autocast_config(make_config, tiny_arch, tiny_checkpoints), tmp_path / "run", progress=False)

    _, labels = read_submission(tmp_path / "run" / "submission.csv")
    assert labels == oracle.ensemble_labels(list(torch.from_numpy(loop[0])), list(torch.from_numpy(loop[1])), CLASSES)
    for name, theirs in zip("ab", loop):
        folder = tmp_path / "run" / "models" / name
        ours = np.load(folder / "test" / "prompt_probs.npy")
        np.testing.assert_array_equal(ours, theirs)
        assert _fp16_exact(np.load(folder / "test" / "image_embeddings.npy"))  # fp16 features, kept as float32
        assert _fp16_exact(np.load(folder / "text_embeddings.npy"))
        assert json.loads((folder / "model.json").read_text())["logit_arithmetic"] == {"dtype": "float16",
                                                                                        "device": "cpu"}
        # the float32 scoring of the first GPU run (features scored in float32) does not give the loop's
        # numbers: the rounding is what this test checks, not a no-op
        in_float32 = joint_softmax_probs(np.load(folder / "test" / "image_embeddings.npy"),
                                         np.load(folder / "text_embeddings.npy"), 100.0, FLOAT32).numpy()
        assert np.abs(in_float32 - theirs).max() > 1e-4


def test_fp16_logits_are_the_fp16_matmul_of_the_scaled_features():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((70, 64)).astype(np.float16).astype(np.float32)
    text = rng.standard_normal((12, 64)).astype(np.float16).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image, text = (x.astype(np.float16).astype(np.float32) for x in (image, text))  # fp16 values, as cached

    logits = scaled_logits(image, text, 100.0, LogitArithmetic.fp16_on("cpu"))
    i16, t16 = torch.from_numpy(image).half(), torch.from_numpy(text).half()
    expected = torch.cat([(100.0 * i16[s:s + 32]) @ t16.T for s in range(0, 70, 32)])
    assert logits.dtype == torch.float16 and torch.equal(logits, expected)
    in_float32 = scaled_logits(image, text, 100.0)
    assert in_float32.dtype == torch.float32 and not torch.equal(logits.float(), in_float32)  # not rounded
    probs = joint_softmax_probs(image, text, 100.0, LogitArithmetic.fp16_on("cpu"))
    assert probs.dtype == torch.float32 and torch.equal(probs, expected.float().softmax(dim=-1))  # autocast's


def test_fp16_arithmetic_is_only_where_the_winner_had_it(make_config, tiny_arch, tiny_checkpoints):
    """autocast on the CPU does nothing (the winner's did nothing there), so its logits stay float32, as the
    CPU parity tests require; fp16 weights without autocast are scored in float32 too."""
    for settings in ({}, {"autocast": False, "precision": "fp16"}):
        config = _autocast_config(make_config, tiny_arch, tiny_checkpoints, **settings)
        assert ModelHandle("a", config.models["a"], "cpu").logit_arithmetic == FLOAT32


def test_the_gpu_parity_script_runs_on_the_cpu_and_prints_the_count_last(scene_dir, tiny_arch, tmp_path, capsys):
    """checks/gpu_parity.py end to end on the CPU, where the winner's autocast does nothing: no label apart."""
    script = runpy.run_path(str(PROJECT_ROOT / "checks" / "gpu_parity.py"), run_name="gpu_parity")
    out = tmp_path / "parity.json"
    report = script["main"](["--device", "cpu", "--arch", str(tiny_arch), "--images", "38", "--scene",
                             str(scene_dir), "--num-workers", "0", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"differing labels: 0 of {len(SCENE_IDS)}"
    assert json.loads(lines[-2]) == report == json.loads(out.read_text())
    assert report["classes_predicted"] > 1 and report["logit_arithmetic"] == FLOAT32.record()
    assert report["max_abs_prob_diff"] < 1e-5 and report["float32_scoring_differing_labels"] == 0
