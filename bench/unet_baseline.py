"""The baseline a user would pick instead of ichseg: a plain MONAI 3-D U-Net trained for a fixed wall-clock budget.

    python bench/unet_baseline.py --train_csv c/train.csv --val_csv c/val.csv --mask_dir c/masks \\
        --out_dir runs/unet --budget_s 300

Recipe (../shared/reference/learning-anchors.md): MONAI ``UNet(spatial_dims=3, channels 16-32-64-128, strides
2-2-2, num_res_units 1)``, ``DiceCELoss(sigmoid=True, batch=True)``, AdamW lr 2e-3 / wd 1e-4, batches of 2 random 64³
crops (2 of 3 centred on a hemorrhage voxel), no augmentation, MONAI sliding-window inference (gaussian, overlap
0.25). It uses ichseg's own cohort validation, preprocessing (same HU window, z-score and target spacing) and crop
sampler, so the only difference to ichseg's numbers is the model and its training. Predictions are resampled back
to each scan's original grid and scored there, as ``predict.py`` does.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader  # noqa: E402
import metrics  # noqa: E402
import utils  # noqa: E402
from config import build_config  # noqa: E402
from data.preprocess import Preprocessing, preprocess_image, resample_to_shape  # noqa: E402

logger = logging.getLogger("ichseg.unet_baseline")
ROI = 64
POSITIVE_CROP_FRACTION = 2 / 3


def build_unet() -> UNet:
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1)


def train_unet(train_csv: str, val_csv: str, mask_dir: str, out_dir: Path, budget_s: float,
               target_spacing: tuple[float, float, float] = (2.0, 2.0, 2.0), seed: int = 0) -> dict:
    """Train for ``budget_s`` seconds of optimisation (data loading included), then score the val scans in their
    original grid. Returns per-scan rows and the cohort summary."""
    config, _ = build_config(["--train_csv", train_csv, "--val_csv", val_csv, "--mask_dir", mask_dir,
                              "--output_dir", str(out_dir), "--cache_dir", str(out_dir / "cache"), "--model", "tiny",
                              "--target_spacing", *map(str, target_spacing), "--normalization", "zscore",
                              "--positive_crop_fraction", str(POSITIVE_CROP_FRACTION), "--augmentation_prob", "0",
                              "--num_workers", "0", "--seed", str(seed)])
    utils.seed_everything(seed)
    cohort = dataloader.validate_cohort(config.data)
    preprocessing = Preprocessing.from_config(config.data, ROI)
    train_loader, _ = dataloader.build_dataloaders(config.data, preprocessing, cohort, batch_size=2,
                                                   device=torch.device("cpu"), seed=seed)
    model = build_unet()
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    started, steps, epoch = time.perf_counter(), 0, 0
    while time.perf_counter() - started < budget_s:
        dataloader.set_epoch(train_loader, epoch)
        for batch in train_loader:
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - started >= budget_s:
                break
        epoch += 1
    train_s = time.perf_counter() - started
    model.eval()
    rows = []
    with torch.no_grad():
        for case in cohort.val:
            image, _ = dataloader.load_image_file(case.image_path)
            volume = torch.as_tensor(preprocess_image(image, case.spacing, preprocessing))[None]
            logits = sliding_window_inference(volume, (ROI,) * 3, 2, model, overlap=0.25, mode="gaussian",
                                              padding_mode="constant", cval=float(volume.min()))
            probabilities = resample_to_shape(torch.sigmoid(torch.as_tensor(logits))[0].numpy(), image.shape,
                                              "linear")
            prediction = (np.asarray(probabilities)[0] >= 0.5).astype(np.uint8)
            truth = (dataloader.load_mask_file(case.mask_path).transpose(case.mask_axes)
                     if case.mask_path else np.zeros(image.shape, np.uint8))
            rows.append({"file": Path(case.image_path).name,
                         **metrics.segmentation_metrics(prediction, truth, case.spacing)})
    return {"train_s": train_s, "steps": steps, "epochs": epoch, "rows": rows, "summary": metrics.summarize(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_csv", required=True)
    parser.add_argument("--val_csv", required=True)
    parser.add_argument("--mask_dir", required=True)
    parser.add_argument("--out_dir", required=True, type=Path)
    parser.add_argument("--budget_s", type=float, default=300.0, help="training wall-clock budget in seconds")
    parser.add_argument("--target_spacing", type=float, nargs=3, default=(2.0, 2.0, 2.0))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = train_unet(args.train_csv, args.val_csv, args.mask_dir, args.out_dir, args.budget_s,
                        tuple(args.target_spacing), args.seed)
    utils.atomic_write_text(args.out_dir / "unet_result.json", json.dumps(result, indent=2, default=float) + "\n")
    logger.info("U-Net: %d steps in %.0f s; Dice on positives %.3f, specificity %.2f", result["steps"],
                result["train_s"], result["summary"]["dice_positive"], result["summary"]["specificity"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
