"""Cohort validation, safe volume loading, preprocessing, caching and DataLoaders for ICH segmentation: the
documented entry point of the data layer, which lives in the ``data`` package (one job per module) and is
re-exported here, so ``import dataloader; dataloader.validate_cohort(config.data)`` keeps working.

Data flow (every axis is in stored array order, spacing tuples too)::

    train/val CSV ──validate_cohort──► Cohort(train, val, warnings)    every file read once; all problems at once
    DataConfig + model.img_size ──Preprocessing.from_config──► Preprocessing   built once; travels with the model
    Case ──LoadPreprocessd (disk + RAM cache)──► image 1×D×H×W float32, label 1×D×H×W uint8 at target spacing
         ├─ train: crop indices (cached) → RandHemorrhageCropd → pad with air → flips / affine / jitter → S³ crops
         └─ val:   the whole preprocessed volume

``preprocess_image`` and ``resample_to_shape`` are the one deterministic intensity/geometry pipeline; predict.py
and the BLIP-2 helper reuse them (and the same readers) for new scans. Randomness of the training loader depends
only on (seed, epoch): call ``set_epoch(train_loader, epoch)`` before iterating an epoch.
"""
from __future__ import annotations

from data.cohort import REQUIRED_COLUMNS, ScanRow, read_scan_csv, validate_cohort
from data.geometry import MaskOrientation, align_mask, label_problem, load_mask_for_image, orient_mask
from data.io import (ARRAY_KEYS, IMAGE_SUFFIXES, MASK_SUFFIXES, MaskHeader, MaskIndex, UnsafePickleError,
                     VolumeLoadError, case_id_from_path, find_mask, is_image_file, load_image_file, load_mask_file,
                     looks_preprocessed, mask_header_spacing, matching_axes, read_mask_header, resolve_spacing)
from data.loaders import (EpochSampler, StageDataset, ThreadDataLoader, build_dataloaders, choose_num_workers,
                          ignore_stop_signals, sample_seed, set_epoch)
from data.normalization import NORMALIZATIONS
from data.preprocess import (PIPELINE_VERSION, Preprocessing, pad_with_air, preprocess_image, preprocessed_shape,
                             resample_to_shape)
from data.records import Case, Cohort, DataValidationError, Problem
from data.stats import compute_dataset_stats, format_stats_table
from data.transforms import (BATCH_KEYS, CropIndicesd, LoadPreprocessd, PadToRoid, RandHemorrhageCropd, Transforms,
                             build_transforms, cache_key)

__all__ = [
    "ARRAY_KEYS", "BATCH_KEYS", "Case", "Cohort", "CropIndicesd", "DataValidationError", "EpochSampler",
    "IMAGE_SUFFIXES", "LoadPreprocessd", "MASK_SUFFIXES", "MaskHeader", "MaskIndex", "MaskOrientation",
    "NORMALIZATIONS", "PIPELINE_VERSION", "PadToRoid", "Preprocessing", "Problem", "REQUIRED_COLUMNS",
    "RandHemorrhageCropd", "ScanRow", "StageDataset", "ThreadDataLoader", "Transforms", "UnsafePickleError",
    "VolumeLoadError", "align_mask", "build_dataloaders", "build_transforms", "cache_key", "case_id_from_path",
    "choose_num_workers", "compute_dataset_stats", "find_mask", "format_stats_table", "ignore_stop_signals",
    "is_image_file", "label_problem", "load_image_file", "load_mask_file", "load_mask_for_image",
    "looks_preprocessed", "mask_header_spacing", "matching_axes", "orient_mask", "pad_with_air", "preprocess_image",
    "preprocessed_shape", "read_mask_header", "read_scan_csv", "resample_to_shape", "resolve_spacing",
    "sample_seed", "set_epoch", "validate_cohort",
]
