"""Data-pipeline benchmark on a generated cohort of realistic size (default 512×512×30 at 0.45×0.45×5 mm).

Reports, per volume: validation time, raw load time and preprocessing time (window + normalise + resample of the
image, nearest resample of the mask); then the cached training throughput (crop + augmentation, volumes/s) over a
few epochs, the whole-volume validation pass, the crop sampler alone (positive/negative crop + padding from the
RAM cache, augmentation off, in this process with one torch thread like a DataLoader worker: crops/s) and peak RSS
(main process, and main + workers sampled).

    python bench/data_bench.py --n_scans 8 --shape 512 512 30 --workers 1
    python bench/data_bench.py --n_scans 12 --epochs 1 --crop_epochs 20    # the crop sampler before/after a change
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules are flat files at the root
import dataloader as D  # noqa: E402
import synthetic as S  # noqa: E402
from config import DataConfig  # noqa: E402
from memory import RssSampler  # noqa: E402


def _mean_ms(values: Sequence[float]) -> str:
    return f"{1000 * sum(values) / max(len(values), 1):8.1f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark cohort validation, preprocessing and cached loading.")
    parser.add_argument("--n_scans", type=int, default=8, help="Scans to generate (a quarter go to val; default 8).")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 30), metavar="N",
                        help="Volume size (default: 512 512 30).")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.45, 0.45, 5.0), metavar="MM",
                        help="Voxel spacing in mm (default: 0.45 0.45 5).")
    parser.add_argument("--target_spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5), metavar="MM",
                        help="Preprocessing target spacing (default: 1.5 1.5 1.5).")
    parser.add_argument("--roi", type=int, default=128, help="Training crop size (default: 128, the real model).")
    parser.add_argument("--batch_size", type=int, default=2, help="Training batch size (default: 2).")
    parser.add_argument("--epochs", type=int, default=3, help="Cached epochs to time (default: 3).")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: automatic).")
    parser.add_argument("--augmentation_prob", type=float, default=0.3, help="Augmentation probability (0.3).")
    parser.add_argument("--crop_epochs", type=int, default=10,
                        help="Epochs of crop sampling to time without augmentation (default 10; 0 skips it).")
    parser.add_argument("--no_memory_cache", action="store_true", help="Disk cache only (cache_in_memory off).")
    parser.add_argument("--out_dir", default=None, help="Work folder (default: a temporary folder, removed after).")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the cohort and the loader (default 0).")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="ichseg_data_bench_"))
    figures: dict[str, Any] = {"shape": list(args.shape), "spacing": list(args.spacing), "n_scans": args.n_scans,
                               "roi": args.roi, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads()}
    try:
        with RssSampler(interval_s=0.1, children=True) as rss:
            n_val = max(1, args.n_scans // 4)
            started = time.perf_counter()
            cohort_files = S.generate_cohort(work / "cohort", args.n_scans - n_val, n_val, shape=args.shape,
                                             spacing=args.spacing, seed=args.seed)
            figures["generate_s_per_scan"] = (time.perf_counter() - started) / args.n_scans

            data_config = DataConfig(train_csv=str(cohort_files.train_csv), val_csv=str(cohort_files.val_csv),
                                     mask_dir=str(cohort_files.mask_dir), cache_dir=str(work / "cache"),
                                     target_spacing=tuple(args.target_spacing), num_workers=args.workers,
                                     augmentation_prob=args.augmentation_prob,
                                     cache_in_memory=not args.no_memory_cache)
            preprocessing = D.Preprocessing.from_config(data_config, args.roi)
            started = time.perf_counter()
            cohort = D.validate_cohort(data_config)
            figures["validate_s_per_scan"] = (time.perf_counter() - started) / args.n_scans
            started = time.perf_counter()
            D.compute_dataset_stats(cohort, data_config)
            figures["stats_s_total"] = time.perf_counter() - started

            load, preprocess, mask_time, shapes = [], [], [], []
            for case in cohort.train + cohort.val:
                t0 = time.perf_counter()
                volume, _ = D.load_image_file(case.image_path)
                t1 = time.perf_counter()
                image = D.preprocess_image(volume, case.spacing, preprocessing)
                t2 = time.perf_counter()
                if case.mask_path:
                    mask = D.load_mask_file(case.mask_path)
                    D.resample_to_shape(D.orient_mask(mask, (case.mask_axes, case.mask_flips))[None], image.shape[1:],
                                        "nearest")
                t3 = time.perf_counter()
                load.append(t1 - t0)
                preprocess.append(t2 - t1)
                mask_time.append(t3 - t2)
                shapes.append(tuple(image.shape[1:]))
            figures.update(load_s_per_scan=float(np.mean(load)), preprocess_s_per_scan=float(np.mean(preprocess)),
                           mask_s_per_scan=float(np.mean(mask_time)), preprocessed_shape=list(shapes[0]))

            # First build: preprocesses every scan into the disk cache (and RAM cache when enabled).
            started = time.perf_counter()
            train, val = D.build_dataloaders(data_config, preprocessing, cohort, args.batch_size,
                                             torch.device("cpu"), seed=args.seed)
            if args.no_memory_cache:  # fill the disk cache explicitly so the epochs below are all warm
                for item in train.dataset.base.data + val.dataset.base.data:
                    D.LoadPreprocessd(preprocessing, work / "cache")(item)
            figures["cache_fill_s_per_scan"] = (time.perf_counter() - started) / args.n_scans
            figures["workers"] = train.num_workers

            epoch_s = []
            for epoch in range(args.epochs):
                D.set_epoch(train, epoch)
                started = time.perf_counter()
                n_volumes = sum(len(batch["case_id"]) for batch in train)
                epoch_s.append(time.perf_counter() - started)
            # The first epoch includes starting the workers; report the steady epochs when there are several.
            steady = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
            figures["train_epoch_s"] = epoch_s
            figures["train_volumes_per_s"] = n_volumes / (sum(steady) / len(steady))
            started = time.perf_counter()
            n_val_volumes = sum(1 for _ in val)
            figures["val_volumes_per_s"] = n_val_volumes / (time.perf_counter() - started)
            del train, val

            if args.crop_epochs > 0:
                # The crop sampler alone: augmentation off, RAM cache, samples drawn in this process exactly as a
                # DataLoader worker draws them (``dataset[(index, epoch)]`` reseeds from (seed, epoch, index)).
                crop_config = dataclasses.replace(data_config, augmentation_prob=0.0, cache_in_memory=True)
                crop_train, _ = D.build_dataloaders(crop_config, preprocessing, cohort, args.batch_size,
                                                    torch.device("cpu"), seed=args.seed)
                dataset = crop_train.dataset
                # One torch thread, as in a DataLoader worker: on a busy machine a second OpenMP thread waiting for
                # a descheduled peer makes each pad/copy ~10x slower and would swamp what is measured.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                started = time.perf_counter()
                for epoch in range(args.crop_epochs):
                    for index in range(len(dataset)):
                        dataset[(index, epoch)]
                figures["crop_samples_per_s"] = args.crop_epochs * len(dataset) / (time.perf_counter() - started)
                torch.set_num_threads(threads)
                del crop_train, dataset
        figures["peak_rss_main_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        figures["peak_rss_main_plus_workers_mib"] = rss.peak / 2**20
    finally:
        if args.out_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"data bench: {args.n_scans} scans {tuple(args.shape)} at {tuple(args.spacing)} mm -> "
          f"{tuple(figures['preprocessed_shape'])} at {tuple(args.target_spacing)} mm, roi {args.roi}, "
          f"batch {args.batch_size}, {figures['workers']} worker(s), torch threads {figures['torch_threads']}")
    print(f"  generate (synthetic)          {_mean_ms([figures['generate_s_per_scan']])} / scan")
    print(f"  validate_cohort               {_mean_ms([figures['validate_s_per_scan']])} / scan")
    print(f"  raw load (pkl, safe)          {_mean_ms([figures['load_s_per_scan']])} / scan")
    print(f"  preprocess image              {_mean_ms([figures['preprocess_s_per_scan']])} / scan")
    print(f"  load + resample mask          {_mean_ms([figures['mask_s_per_scan']])} / scan")
    print(f"  cache fill (build_dataloaders){_mean_ms([figures['cache_fill_s_per_scan']])} / scan")
    print(f"  cached train crop+augment     {figures['train_volumes_per_s']:8.1f} volumes/s "
          f"(epochs: {', '.join(f'{s:.2f}' for s in figures['train_epoch_s'])} s)")
    print(f"  cached val whole volumes      {figures['val_volumes_per_s']:8.1f} volumes/s")
    if "crop_samples_per_s" in figures:
        print(f"  crop sampler (no augmentation){figures['crop_samples_per_s']:8.1f} crops/s "
              f"({args.crop_epochs} epochs of {args.n_scans - max(1, args.n_scans // 4)} scans)")
    print(f"  peak RSS main / main+workers  {figures['peak_rss_main_mib']:.0f} / "
          f"{figures['peak_rss_main_plus_workers_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
