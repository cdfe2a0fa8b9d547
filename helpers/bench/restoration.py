"""`python -m helpers.bench restoration`: what each preprocessing step does to the dev set's blur, measured against
the clean photos (`helpers.research.restoration`), and how fast each runs on this CPU. The last line is one JSON
object (also written to --out)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import load_config
from ..infra.files import PROJECT_ROOT
from ..research.restoration import degraded_pairs, restoration_table, step_rate
from ..research.steps import Step
from ..research.steps.restore import RichardsonLucy, UnsharpMask, Wiener
from ..research.steps.standard import Sharpen
from . import cpu_model, write_report

WINNER = "sharpen factor=2.3 (the winner's)"
BLURRED = "none (the blurred input)"
WIENER_BALANCE = 0.1  # the Wiener setting whose rate is `wiener_images_per_s`


def settings(sigma: float) -> dict[str, list[Step]]:
    """The grid: sharpening, unsharp masking, and both deconvolutions around the PSF of `sigma` px (the test set's
    estimated blur): Wiener's balance, a PSF 1.3 px too narrow and too wide, and each with periodic edges."""
    grid: dict[str, list[Step]] = {BLURRED: [], WINNER: [Sharpen(2.3)], "sharpen factor=3.0": [Sharpen(3.0)]}
    for radius in (3.0, 6.0):
        for amount in (1.0, 3.0):
            grid[f"unsharp_mask radius={radius:g} amount={amount:g}"] = [UnsharpMask(radius, amount)]
    for balance in (0.01, 0.03, 0.1, 0.3):
        grid[f"wiener balance={balance:g}"] = [Wiener(sigma, balance=balance)]
    for off in (-1.3, 1.3):
        grid[f"wiener sigma={sigma + off:.2f} balance=0.1"] = [Wiener(round(sigma + off, 2), balance=0.1)]
    grid["wiener balance=0.1 edges=periodic"] = [Wiener(sigma, "periodic", balance=0.1)]
    for iterations in (10, 30):
        grid[f"richardson_lucy iterations={iterations}"] = [RichardsonLucy(sigma, iterations=iterations)]
    grid["richardson_lucy iterations=10 edges=periodic"] = [RichardsonLucy(sigma, "periodic", iterations=10)]
    return grid


def restoration_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench restoration", description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml", help="its dev set (built on first use, as the "
                        "config says) and its test set, whose estimated blur is the PSF's sigma (sigma: auto)")
    parser.add_argument("--limit", type=int, help="only the first N dev images")
    parser.add_argument("--rounds", type=int, default=3, help="passes of the Wiener rate; the best is reported")
    parser.add_argument("--out", help="JSON file (default: outputs/bench/restoration.json)")
    args = parser.parse_args(argv)
    from ..runs.pipeline import estimated_blur, load_run_data

    config = load_config(args.config)
    if config.data.dev is None:
        parser.error(f"{args.config} has no dev set (data.dev): the clean photos are the dev set's sources")
    data = load_run_data(config)
    blur = estimated_blur(config, data.splits)
    sigma = blur["sigma_px"]
    pairs = degraded_pairs(config.data.dev.path, args.limit)
    table = restoration_table(pairs, settings(sigma), progress=True)
    mirror = step_rate(pairs, Wiener(sigma, balance=WIENER_BALANCE), args.rounds)
    periodic = step_rate(pairs, Wiener(sigma, "periodic", WIENER_BALANCE), args.rounds)
    rates = {"wiener_images_per_s": mirror["wall"], "wiener_images_per_cpu_s": mirror["cpu"],
             "wiener_periodic_images_per_s": periodic["wall"], "wiener_periodic_images_per_cpu_s": periodic["cpu"]}
    deconvolutions = table[table["setting"].str.startswith(("wiener", "richardson_lucy"))]
    best = deconvolutions.loc[deconvolutions["gain_db"].idxmax()]
    by_setting = table.set_index("setting")
    report = {
        "machine": cpu_model(), "config": args.config, "dev_set": config.data.dev.path, "images": len(pairs.names),
        "degraded_identical_to_dev_files": pairs.identical, "dev_set_blur": pairs.recipe,
        "sigma_auto_px": sigma, "sigma_auto_estimated_on": {k: blur[k] for k in ("split", "images")},
        "psnr_db": by_setting["psnr_db"].round(3).to_dict(), "psnr_gain_db": by_setting["gain_db"].round(3).to_dict(),
        "ssim": by_setting["ssim"].round(4).to_dict(), "ssim_gain": by_setting["ssim_gain"].round(4).to_dict(),
        "images_per_s": by_setting["images_per_s"].dropna().round(1).to_dict(),
        "best_deconvolution": best["setting"], "best_deconvolution_gain_db": round(float(best["gain_db"]), 3),
        "winner_sharpening_gain_db": round(float(by_setting.loc[WINNER, "gain_db"]), 3),
        **{k: round(v, 1) for k, v in rates.items()},
        "richardson_lucy_images_per_s": round(float(by_setting.loc["richardson_lucy iterations=10", "images_per_s"]),
                                              1),
        "targets": {"best_deconvolution_gain_db": 1.0, "wiener_images_per_s": 300},
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes on the cores slow the clock's rates
    }
    shown = table.assign(images_per_s=table["images_per_s"].map(lambda v: "-" if v != v else f"{v:.0f}"))
    print(f"{len(pairs.names)} dev images of {config.data.dev.path} ({pairs.identical} degraded again byte for byte "
          f"as built: sigma {pairs.recipe['sigma']} px, JPEG quality {pairs.recipe['jpeg_quality']}), against their "
          f"clean photos at {pairs.recipe['size']} px; PSF sigma {sigma} px (sigma: auto, the {blur['split']} set's "
          f"estimated blur); {cpu_model()}")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"Wiener alone (balance {WIENER_BALANCE:g}), best of {args.rounds} passes: "
          f"{rates['wiener_images_per_s']:.0f} images/s, {rates['wiener_images_per_cpu_s']:.0f} per CPU second "
          f"(periodic edges: {rates['wiener_periodic_images_per_s']:.0f}, "
          f"{rates['wiener_periodic_images_per_cpu_s']:.0f}); load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores")
    write_report(report, Path(args.out or PROJECT_ROOT / "outputs" / "bench" / "restoration.json"))
