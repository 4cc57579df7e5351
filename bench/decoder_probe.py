"""Which part of a trained model segments: the SAM decoder's own answer against the refined one, per scan.

The mask refiner (``modeling/refiner.py``) adds an image-guided correction to the decoder's upsampled logits. When
it learns the whole task the decoder's logits stay flat, and then neither the ViT encoder nor the prompt path reach
the answer: the tiny build stops standing in for turbo. This probe makes that visible. For every validation scan it
runs the prompt-free sliding window once (no mirroring; both answers from the same pass) on the model's grid and reports, for the decoder's answer
(``coarse_masks``) and the refined one (``masks``): Dice against the mask resampled to that grid, predicted mL and
the probability's spread inside the bleed and in the rest of the head (5th / 50th / 95th percentile). A decoder
whose in-bleed median equals its head median has learned nothing. ``--json`` also writes the mean Dice of each
answer over the ICH-positive scans (``bench/learning_bench.py`` reports the decoder's for every run).

    python bench/decoder_probe.py --run_dir /tmp/lb0/runs/ctich --input /tmp/lb0/cohorts/ctich/val.csv \
        --mask_dir /tmp/lb0/cohorts/ctich/masks --out /tmp/lb0/ctich_decoder_probe.md [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the project's modules are flat files at the repository root
import metrics  # noqa: E402
import utils  # noqa: E402
from data.geometry import load_mask_for_image  # noqa: E402
from data.io import MaskIndex, VolumeLoadError, load_image_file  # noqa: E402
from data.preprocess import resample_to_shape  # noqa: E402
from inference import sliding_window_logits  # noqa: E402
from predict import PredictionError, Predictor, collect_inputs, scan_geometry  # noqa: E402

logger = logging.getLogger("bench.decoder_probe")
PARTS = ("coarse_masks", "masks")  # the decoder's own answer, then the refined one


class _BothAnswers(torch.nn.Module):
    """The model with its PARTS stacked as the channels of ``masks``: one sliding window yields both."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(window)
        return {"masks": torch.cat([out[key] for key in PARTS], dim=1)}


def _spread(values: np.ndarray) -> str:
    return "–" if values.size == 0 else " / ".join(f"{v:.2f}" for v in np.percentile(values, (5, 50, 95)))


def probe_scan(predictor: Predictor, path: Path, mask_path: Path | None) -> dict[str, dict[str, Any]]:
    """{part: {dice, ml, bleed, head, positive}} for one scan on the model's grid (an ICH-negative scan has empty
    truth; ``positive``: the truth holds blood on that grid)."""
    image, meta = load_image_file(path)
    spacing, _ = scan_geometry(path, meta, image.shape, mask_path, predictor.config.data.spacing)
    truth = (load_mask_for_image(mask_path, image.shape, meta.get("affine"))[0] if mask_path is not None
             else np.zeros(image.shape, dtype=np.uint8))
    volume = predictor.prepare(image, spacing)
    grid_truth = resample_to_shape(np.asarray(truth, dtype=np.uint8)[None], volume.shape[2:], "nearest")[0] > 0
    head = volume[0, 0].cpu().numpy() > float(volume.min())  # above the air value the crops are padded with
    voxel_ml = float(np.prod(predictor.preprocessing.target_spacing)) / 1000.0
    rows = {}
    with torch.no_grad():
        probabilities = torch.sigmoid(sliding_window_logits(_BothAnswers(predictor.model), volume,
                                                            predictor.roi_size))[0].cpu().numpy()
    for probability, key in zip(probabilities, PARTS):
        predicted = probability >= 0.5
        rows[key] = {"dice": metrics.dice(predicted, grid_truth), "ml": float(predicted.sum()) * voxel_ml,
                     "bleed": _spread(probability[grid_truth]), "head": _spread(probability[head & ~grid_truth]),
                     "positive": bool(grid_truth.any())}
    return rows


def positive_means(scans: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float | None]:
    """{part: mean Dice over the ICH-positive scans} (None without any) from {scan: probe_scan(...)}."""
    positives = [rows for rows in scans.values() if rows[PARTS[0]]["positive"]]
    return {part: (sum(rows[part]["dice"] for rows in positives) / len(positives) if positives else None)
            for part in PARTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", type=Path, required=True, help="a training run (its best_model.pth)")
    parser.add_argument("--input", type=Path, required=True, help="validation CSV (path,ich,...) or scans")
    parser.add_argument("--mask_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="Markdown table (default: printed only)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (turbo is slow on a CPU)")
    parser.add_argument("--json", type=Path, default=None,
                        help="every scan's numbers and the mean Dice of each answer over ICH-positive scans")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        predictor = Predictor(args.run_dir / "best_model.pth", utils.resolve_device(args.device))
        masks = MaskIndex(args.mask_dir)
        scans_to_probe = collect_inputs(args.input)
    except (PredictionError, VolumeLoadError, OSError, ValueError) as error:  # each names the file or the value
        parser.error(str(error))
    lines = [f"Decoder probe of `{args.run_dir}` on `{args.input}` (prompt-free, one pass, model grid; "
             "probability p5 / p50 / p95)", "",
             "| scan | decoder Dice | decoder mL | decoder p in bleed | decoder p in head | refined Dice | refined mL "
             "| refined p in bleed | refined p in head |", "|---|---|---|---|---|---|---|---|---|"]
    scans = {}
    for scan in scans_to_probe:
        rows = scans[scan.path.name] = probe_scan(predictor, scan.path, masks.find(scan.path))
        cells = [f"{rows[part]['dice']:.3f} | {rows[part]['ml']:.2f} | {rows[part]['bleed']} | {rows[part]['head']}"
                 for part in PARTS]
        lines.append(f"| {scan.path.name} | " + " | ".join(cells) + " |")
        logger.info("%s", lines[-1])
    means = positive_means(scans)
    lines += ["", "Mean Dice over ICH-positive scans: decoder "
              + ", refined ".join("–" if means[p] is None else f"{means[p]:.3f}" for p in PARTS)]
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        utils.atomic_write_text(args.out, text)
    if args.json is not None:
        utils.atomic_write_text(args.json, json.dumps({"scans": scans, "decoder_dice_positive": means["coarse_masks"],
                                                       "refined_dice_positive": means["masks"]}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
