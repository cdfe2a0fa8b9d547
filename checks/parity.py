"""Parity at full size: the workbench against the winner's notebook code with ViT-B-32-quickgelu.

Two randomly initialised ViT-B-32-quickgelu checkpoints (seeds 1 and 2) stand in for MetaCLIP and EVA-CLIP
(random weights: the compute and the code path are the real ones). Both sides read the first N challenge
images; the script prints how many labels differ (the target is none), with and without the 0.002 drop.

    .venv/bin/python checks/parity.py [--images 256] [--scene ../shared/data/scene/Scene]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.bench.runners import scene_subset  # noqa: E402
from helpers.config import config_from_dict  # noqa: E402
from helpers.research import oracle  # noqa: E402
from helpers.runs.outputs import read_submission  # noqa: E402
from helpers.runs.pipeline import predict  # noqa: E402

ARCH = "ViT-B-32-quickgelu"
WINNER_SETTINGS = {"precision": "fp32", "autocast": True, "batch_size": 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--scene", default=str(Path(__file__).resolve().parents[2] / "shared/data/scene/Scene"))
    args = parser.parse_args()
    scene = Path(args.scene)
    classes = json.loads((scene / "classes.json").read_text())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subset = tmp / "Scene"
        scene_subset(scene, args.images, subset)

        checkpoints, oracle_probs = [], []
        t0 = time.perf_counter()
        for seed, sharpness in ((1, 2.3), (2, 2.0)):
            torch.manual_seed(seed)
            model = open_clip.create_model(ARCH)
            checkpoints.append(tmp / f"seed{seed}.pt")
            torch.save(model.state_dict(), checkpoints[-1])
            model = open_clip.create_model(ARCH, pretrained=str(checkpoints[-1]))
            oracle_probs.append(oracle.open_clip_probs(model, open_clip.tokenizer, oracle.winner_prompts(classes),
                                                       str(tmp), "Scene", oracle.make_processor(sharpness)))
        oracle_seconds = time.perf_counter() - t0

        report = {"arch": ARCH, "images": args.images, "oracle_seconds": round(oracle_seconds, 1)}
        for drop in (None, 0.002):
            config = config_from_dict({
                "name": "parity", "data": {"test": str(scene), "limit": args.images}, "prompts": "winner",
                "scoring": "joint_softmax_mean", "cache_dir": str(tmp / "cache"),
                # the winner's settings: fp32 weights under autocast (a no-op on the CPU), batches of 32
                "models": {"a": {"backend": "open_clip", "arch": ARCH, "pretrained": str(checkpoints[0]),
                                 "sharpness": 2.3, **WINNER_SETTINGS},
                           "b": {"backend": "open_clip", "arch": ARCH, "pretrained": str(checkpoints[1]),
                                 "sharpness": 2.0, **WINNER_SETTINGS}},
                "ensemble": {"weights": {"a": 0.5, "b": 0.5}, "drop_below": drop},
            })
            t0 = time.perf_counter()
            predict(config, tmp / f"run-{drop}", progress=False)
            ids, labels = read_submission(tmp / f"run-{drop}" / "submission.csv")
            expected = oracle.ensemble_labels(*oracle_probs, classes, drop=drop is not None)
            key = "drop_0.002" if drop else "no_drop"
            report[key] = {"differing_labels": int(np.sum(np.array(labels) != np.array(expected))),
                           "classes_predicted": len(set(expected)),
                           "workbench_seconds": round(time.perf_counter() - t0, 1)}
        for name, probs in zip("ab", oracle_probs):
            ours = np.load(tmp / "run-None" / "models" / name / "test" / "prompt_probs.npy")
            report[f"max_abs_prob_diff_{name}"] = float(np.abs(ours - torch.stack(probs).numpy()).max())
    print(f"differing labels: {report['no_drop']['differing_labels']} of {args.images} (no drop), "
          f"{report['drop_0.002']['differing_labels']} of {args.images} (drop <= 0.002)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
