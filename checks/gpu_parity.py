"""The winner's arithmetic on a GPU: `predict` with the winner's settings against its literal loop, same GPU.

One randomly initialised ViT-bigG-14-quickgelu (seeded: the compute and the code path are the real ones) reads the
first N challenge images at sharpening 2.3 with the 312 prompts, twice: through the winner's notebook loop
(`helpers/research/oracle.py`, under the real `torch.cuda.amp.autocast()`), and through `predict` with the winner's
settings (fp32 weights, `autocast: true`, batch 32). The target is no label and no per-prompt probability apart
(<= 1e-6). For comparison it also scores the workbench's own features in float32, as the workbench did before it
rounded as the winner's fp16 matmul does. Figures go to `--out` as they come; the last line printed is the count.

    .venv/bin/python checks/gpu_parity.py [--images 1024] [--arch ViT-bigG-14-quickgelu] [--device cuda]
        [--scene ../shared/data/scene/Scene] [--out outputs/bench/gpu_parity.json]

On the CPU (`--device cpu`, a small `--arch`) the winner's autocast does nothing, and the count must be 0 too.
"""

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.bench.runners import arch_name, scene_subset  # noqa: E402
from helpers.config import config_from_dict  # noqa: E402
from helpers.models import ModelHandle, resolve_device  # noqa: E402
from helpers.research import oracle  # noqa: E402
from helpers.research.scoring import FLOAT32, joint_softmax_probs  # noqa: E402
from helpers.runs.outputs import read_submission  # noqa: E402
from helpers.runs.pipeline import predict  # noqa: E402

SHARPNESS, SEED = 2.3, 0


def _labels(probs: np.ndarray, class_names: list[str]) -> np.ndarray:
    """The winner's labels of one model: its ensemble cell with this model's weight 1."""
    rows = list(torch.from_numpy(probs))
    return np.array(oracle.ensemble_labels(rows, rows, class_names, 1.0, 0.0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--arch", default="ViT-bigG-14-quickgelu", help="open_clip name or architecture JSON")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-workers", type=int, default=8, help="decoding processes of both sides")
    parser.add_argument("--scene", default=str(Path(__file__).resolve().parents[2] / "shared/data/scene/Scene"))
    parser.add_argument("--out", default="outputs/bench/gpu_parity.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*(torch\.cuda\.amp\.autocast|CUDA is not available).*")
    scene, out = Path(args.scene), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = json.loads((scene / "classes.json").read_text())
    device = resolve_device(args.device)
    arch = arch_name(args.arch)
    report = {"arch": arch, "images": 0, "device": str(device), "torch": torch.__version__, "open_clip":
              open_clip.__version__, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu"}

    def save(**figures) -> None:
        report.update(figures)
        out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subset = tmp / "Scene"
        save(images=len(scene_subset(scene, args.images, subset)))
        entry = {"backend": "open_clip", "arch": arch, "pretrained": "random", "seed": SEED, "sharpness": SHARPNESS,
                 "precision": "fp32", "autocast": True, "batch_size": 32}  # the winner's settings
        config = config_from_dict({
            "name": "gpu-parity", "data": {"test": str(subset)}, "prompts": "winner",
            "scoring": "joint_softmax_mean", "logit_scale": 100, "cache_dir": str(tmp / "cache"),
            "device": str(device), "num_workers": args.num_workers, "models": {"bigg": entry},
            "ensemble": {"weights": {"bigg": 1.0}},
        })

        # the loop gets the very model the workbench builds from the same entry (seeded random weights)
        handle = ModelHandle("bigg", config.models["bigg"], device)
        model = handle.encoder.model
        start = time.perf_counter()
        loop_rows = oracle.open_clip_probs(model, open_clip.tokenizer, oracle.winner_prompts(classes), str(tmp),
                                           "Scene", oracle.make_processor(SHARPNESS), device=device,
                                           num_workers=args.num_workers)
        theirs = np.array(oracle.ensemble_labels(loop_rows, loop_rows, classes, 1.0, 0.0))  # literally: on the GPU
        loop = torch.stack(loop_rows).cpu().numpy()
        del loop_rows
        save(loop_seconds=round(time.perf_counter() - start, 1))
        del model
        handle.close()

        start = time.perf_counter()
        predict(config, tmp / "run", progress=False)
        save(workbench_seconds=round(time.perf_counter() - start, 1))
        folder = tmp / "run" / "models" / "bigg"
        ours = np.load(folder / "test" / "prompt_probs.npy")
        _, labels = read_submission(tmp / "run" / "submission.csv")
        in_float32 = joint_softmax_probs(np.load(folder / "test" / "image_embeddings.npy"),
                                         np.load(folder / "text_embeddings.npy"), 100.0, FLOAT32).numpy()
        model_json = json.loads((folder / "model.json").read_text())
        save(differing_labels=int(np.sum(np.array(labels) != theirs)),
             max_abs_prob_diff=float(np.abs(ours - loop).max()),
             classes_predicted=len(set(theirs.tolist())),
             logit_arithmetic=model_json["logit_arithmetic"],
             float32_scoring_differing_labels=int(np.sum(_labels(in_float32, classes) != theirs)),
             float32_scoring_max_abs_prob_diff=float(np.abs(in_float32 - loop).max()))
    report["targets_met"] = {"differing_labels": report["differing_labels"] == 0,
                             "max_abs_prob_diff": report["max_abs_prob_diff"] <= 1e-6}
    save()
    print(json.dumps(report))
    print(f"differing labels: {report['differing_labels']} of {report['images']}")
    return report


if __name__ == "__main__":
    main()
