"""The data layer, one job per module. ``dataloader.py`` at the project root is the documented entry point and
re-exports the public names; first-party code imports the module it needs.

- ``normalization``: the intensity-normalisation modes (one entry each; numpy only, so ``config`` can list them).
- ``io``: reading scans and masks safely (restricted unpickler, NIfTI), geometry and the one spacing rule.
- ``geometry``: bringing a mask into its image's voxel grid (affines, orientation) and checking it lies on blood.
- ``budget``: sizes before work: reading, preprocessing and caching against the RAM and disk available.
- ``preprocess``: the ``Preprocessing`` settings value and the deterministic window/normalise/resample pipeline.
- ``records``: what validation produces (``Case``, ``Cohort``) and how it reports problems.
- ``cohort``: reading the cohort CSVs and validating every file before training.
- ``stats``: per-scan facts gathered while validating and the dataset statistics.
- ``transforms``: the MONAI pipeline (disk cache, crop indices, crops, augmentation), defined once.
- ``loaders``: per-sample seeding, samplers and the training/validation DataLoaders.
"""
