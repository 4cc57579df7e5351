"""One typed configuration for a training run, built once from the command line.

Each flag is declared exactly once, as a field of a frozen dataclass with its help text in the field's
metadata; the argparse parser and its groups are generated from those fields, so the flag name, the
attribute name and the key in ``config.json`` are always the same word. ``Config.validate`` raises for
impossible settings and returns warnings for risky ones; ``build_config`` is the only constructor the CLI uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints

from data.normalization import NORMALIZATIONS
from utils import atomic_write_text

MODEL_NAMES = ("sam_med3d_turbo", "tiny")
SCHEDULER_TYPES = ("reduce_on_plateau", "cosine", "step")
PROMPT_MODES = ("clicks", "none", "mixed")
DEVICES = ("auto", "cuda", "cpu")
# Weights each architecture starts from unless told otherwise: the published file where one exists.
CHECKPOINT_DEFAULTS = {"sam_med3d_turbo": "turbo", "tiny": None}
# SAM-Med3D's reference training runs the prompt encoder and mask decoder at 0.1x the encoder's learning rate.
PRETRAINED_DECODER_LR_SCALE = 0.1
# Upper bound of the per-voxel weight of hemorrhage in the cross-entropy (objective.SegmentationLoss): measured on
# the synthetic cohort, balancing lifted the tiny model off the empty-mask plateau ~2x sooner; the cap limits the
# false positives an unbounded weight invites on tiny bleeds.
MAX_HEMORRHAGE_WEIGHT = 10.0


# Settings added after configs were first saved, with the value that reproduces what those runs did (a saved
# config without the key predates it): checkpoints from before the mask refiner have none, nor dropped components,
# and runs from before deep supervision trained without the decoder term.
_ABSENT_FROM_OLDER_CONFIGS: dict[str, dict[str, Any]] = {
    "model": {"mask_refiner": False, "min_component_ml": 0.0, "min_component_peak": 0.5},
    "train": {"decoder_loss_weight": 0.0}}


def component_filter_problems(min_ml: float | None, min_peak: float | None) -> list[str]:
    """Out-of-range settings of the prompt-free component filter (None: not given), for the training config and
    ``predict.py``'s overrides alike."""
    problems = []
    if min_ml is not None and not min_ml >= 0:
        problems.append(f"--min_component_ml must be >= 0 mL (0 keeps every component), got {min_ml}")
    if min_peak is not None and not 0.5 <= min_peak < 1:
        problems.append(f"--min_component_peak must be in [0.5, 1) (0.5 keeps every component), got {min_peak}")
    return problems


class ConfigError(ValueError):
    """Raised when the requested settings cannot work; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _flag(help: str, *, flag: str | None = None, choices: Sequence[str] | None = None, metavar: str | None = None,
          default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
          cli_default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that also carries its command-line description.

    ``cli_default``: what the command line starts from when it differs from the field's (library) default, e.g.
    ``"auto"`` settings that ``build_config`` resolves from other flags (``Config.resolve_defaults``); a Config
    built in code keeps the plain default.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "cli_default": cli_default}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DataConfig:
    """Where the cohort lives and how volumes are preprocessed and sampled."""

    train_csv: str | None = _flag("CSV with columns path,ich,patient_id for training scans.", default=None)
    val_csv: str | None = _flag("CSV with columns path,ich,patient_id for validation scans.", default=None)
    folds_dir: str | None = _flag(
        "Cross-validation: the folder splits.py wrote (fold_<k>/train.csv, fold_<k>/val.csv); replaces --train_csv "
        "and --val_csv, and each fold trains into <output_dir>/fold_<k>.", default=None)
    mask_dir: str | None = _flag("Folder of binary NIfTI masks named after the image file number (049.pkl -> 049.nii).",
                                 default=None)
    cache_dir: str | None = _flag("Folder for preprocessed volumes (default: <output_dir>/cache).", default=None)
    spacing: tuple[float, float, float] = _flag(
        "Fallback voxel spacing in mm (array axis order) for scans whose pkl and mask carry none.",
        default=(1.0, 1.0, 1.0), metavar="MM")
    target_spacing: tuple[float, float, float] = _flag(
        "Resample every scan to this spacing in mm; SAM-Med3D was pretrained at 1.5 mm isotropic.",
        default=(1.5, 1.5, 1.5), metavar="MM")
    hu_window: tuple[float, float] = _flag(
        "Clip raw HU to [low, high] before normalisation: keeps brain, blood and CSF, saturates bone.",
        default=(-100.0, 200.0), metavar="HU")
    normalization: str = _flag(
        "Intensity normalisation. auto: sam_med3d when fine-tuning sam_med3d_turbo from pretrained weights (the "
        "input distribution they were trained on: clamp -1000..1000 HU, z-score over voxels > 0 HU), else zscore "
        "(the --hu_window brain window, z-scored inside the head).", default="zscore",
        choices=("auto", *NORMALIZATIONS), cli_default="auto")
    positive_crop_fraction: float = _flag(
        "Fraction of training crops centred on hemorrhage in ICH-positive scans.", default=0.75)
    hard_negative_crop_fraction: float = _flag(
        "Fraction of the other training crops (all crops of ICH-negative scans) centred on hyperdense tissue that "
        "is not hemorrhage and not next to bone (streaks, dense brain): the look-alikes a model calls blood.",
        default=0.0)
    false_positive_crop_fraction: float = _flag(
        "Fraction of a training scan's crops centred on voxels the model being trained calls blood there but are "
        "not (found by a prompt-free pass over the training scans every --false_positive_mining_every epochs; "
        "0: off): the streaks and rims a small cohort shows too rarely to learn from uniform crops.",
        default=0.0, metavar="FRACTION")
    hard_case_fraction: float = _flag(
        "Fraction of each epoch's training scans drawn in proportion to their recent training loss, within the "
        "ICH-positive and the ICH-negative scans separately (the rest uniformly; with replacement when > 0): a kind "
        "of bleed seen in one scan gets the crops it needs.",
        default=0.0, metavar="FRACTION")
    augmentation_prob: float = _flag("Probability of each random augmentation (flip, affine, intensity).",
                                     default=0.3)
    in_plane_rotation_deg: float = _flag(
        "Training crops are also rotated about the scan's slice axis (largest spacing) by up to this many degrees "
        "(with --augmentation_prob; 0: off): a bleed along the skull looks alike at every position around it.",
        default=0.0, metavar="DEG")
    scale_augmentation: float = _flag(
        "The affine augmentation scales each axis by a factor drawn from 1 ± this (with --augmentation_prob): "
        "bleeds thinner and thicker than the ones in training.", default=0.1, metavar="FRACTION")
    lesion_paste_prob: float = _flag(
        "Probability that a training crop gets one of the training set's own bleeds (image and label) pasted at a "
        "random head-tissue position, mirrored or turned, cut by bone (0: off): blood is learned by its density "
        "rather than by the few places a small cohort shows it.", default=0.0, metavar="PROB")
    lesion_paste_into_negatives: float = _flag(
        "With --lesion_paste_prob: the fraction of the ICH-negative scans' crops drawn for a paste that get it (1: "
        "all, as for positives; 0: none). A negative crop left blood-free still shows what no blood looks like, "
        "streaks and all, and with --empty_crop_dice_volume its false positives are charged.", default=1.0,
        metavar="FRACTION")
    lesion_paste_at_bone: float = _flag(
        "With --lesion_paste_prob: the fraction of the pastes of bleeds that lay against bone (subdural crescents) "
        "placed against the crop's bone, facing it, instead of anywhere (0: anywhere): a crescent is learned where "
        "crescents are.", default=0.0, metavar="FRACTION")
    streak_augmentation_prob: float = _flag(
        "Probability that a training crop gets 1-3 beam-hardening-like bright or dark bands across its head tissue "
        "(label unchanged; 0: off): the look-alike a small cohort shows too rarely to learn it is not blood.",
        default=0.0, metavar="PROB")
    num_workers: int | None = _flag("DataLoader worker processes (default: chosen from CPU count and free RAM).",
                                    default=None)
    allow_patient_overlap: bool = _flag(
        "Allow the same patient_id in train and val (patient leakage inflates validation scores).", default=False)
    allow_unusual_masks: bool = _flag(
        "Keep masks that validation refuses as misplaced, as warnings: an ICH-positive mask not on blood (median "
        "outside 30-100 HU, or over 5 percent of it in air or bone), or one whose affine puts it off the image's "
        "grid (then used voxel for voxel).", default=False)
    cache_in_memory: bool = _flag("Keep preprocessed volumes in RAM as well as on disk (off: --no-cache_in_memory).",
                                  default=True)


@dataclass(frozen=True)
class ModelConfig:
    """Which SAM-Med3D variant to build and how to initialise it."""

    name: str = _flag("Architecture: the real ViT-B at 128^3, or a tiny variant at 64^3 for tests.",
                      flag="model", default="sam_med3d_turbo", choices=MODEL_NAMES)
    pretrained_checkpoint: str | None = _flag(
        "SAM-Med3D weights: 'auto' (the published SAM-Med3D-turbo file for --model sam_med3d_turbo; none for tiny, "
        "which has no published weights), 'turbo', a local .pth path, or 'none' to train from scratch on purpose.",
        default=None, cli_default="auto")
    visual_tokens: int = _flag("Width of the visual tokens produced for the BLIP-2 path.", default=256)
    freeze_encoder: bool = _flag("Freeze the image encoder; train prompt encoder, decoder and heads only.",
                                 default=False)
    use_gradient_checkpointing: bool = _flag("Recompute encoder blocks in backward to save activation memory.",
                                             default=False)
    mask_refiner: bool = _flag(
        "Refine the decoder's masks at full resolution from the image (starts as the identity; off: "
        "--no-mask_refiner).", default=True)
    min_component_ml: float = _flag(
        "Prompt-free answers drop connected components smaller than this many mL (0: keep all); clicked answers "
        "keep what the clicks add.", default=0.3, metavar="ML")
    min_component_peak: float = _flag(
        "Prompt-free answers also drop connected components whose most confident voxel has a probability under "
        "this (0.5: keep all): a blob is kept only with a confident core.", default=0.5, metavar="P")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, prompting, validation and checkpointing."""

    output_dir: str = _flag("Folder for checkpoints, logs and summaries.", default="./outputs")
    epochs: int = _flag("Maximum number of epochs.", default=200)
    batch_size: int = _flag("Crops per optimisation micro-batch.", default=2)
    lr: float = _flag("Peak learning rate (AdamW) of the image encoder.", default=1e-4)
    decoder_lr_scale: float = _flag(
        "Learning rate of the prompt encoder and mask decoder as a multiple of --lr (default: 0.1 when starting from "
        "pretrained weights, as SAM-Med3D's own training does; 1.0 from scratch).", default=1.0, cli_default=None)
    scratch_lr: float = _flag(
        "Learning rate of the parts that start from scratch even when fine-tuning: the mask refiner and the "
        "representation head.", default=2e-3)
    weight_decay: float = _flag("AdamW weight decay.", default=1e-4)
    gradient_accumulation_steps: int = _flag("Micro-batches per optimiser step.", default=4)
    max_grad_norm: float = _flag("Clip the global gradient norm to this value (0 disables clipping).", default=1.0)
    scheduler_type: str = _flag("Learning-rate schedule.", default="reduce_on_plateau", choices=SCHEDULER_TYPES)
    warmup_epochs: int = _flag("Linear warm-up epochs for the cosine schedule.", default=2)
    step_size: int = _flag("Epochs between decays for the step schedule.", default=30)
    lr_decay_factor: float = _flag("Multiplicative decay for the step and plateau schedules.", default=0.5)
    patience: int = _flag("Early stopping: validations without Dice improvement before stopping.", default=15)
    use_mixed_precision: bool = _flag("bf16 autocast where supported, else fp16 with gradient scaling.",
                                      default=False)
    prompt_mode: str = _flag("Prompts during training: simulated clicks, none (automatic), or a mix of both.",
                             default="mixed", choices=PROMPT_MODES)
    click_rounds: int = _flag("Simulated click rounds per batch in click mode (first click + corrections).",
                              default=3)
    ich_loss_weight: float = _flag("Weight of the BCE loss on the ICH-presence logit.", default=0.5)
    decoder_loss_weight: float = _flag(
        "Weight of the mask loss on the SAM decoder's own masks, before the refiner (deep supervision): keeps the "
        "prompt path a segmenter instead of letting the refiner do all the work.", default=0.3)
    final_hemorrhage_weight: float = _flag(
        f"The cap on the cross-entropy weight of hemorrhage voxels falls linearly from {MAX_HEMORRHAGE_WEIGHT:g} at "
        "the first epoch to this at the last (10: constant). The weight gets a cold model off the empty answer, but "
        "with weight w the 0.5 threshold calls a voxel blood once its chance of being blood is 1 / (1 + w): a "
        "smaller weight at the end means less over-segmentation and fewer look-alikes, and fewer faint bleeds.",
        default=MAX_HEMORRHAGE_WEIGHT, metavar="W")
    hard_voxel_fraction: float = _flag(
        "Fraction of each crop's voxels, those with the largest loss, that the cross-entropy averages over "
        "(nnU-Net's TopK loss, on the hemorrhage-weighted cross-entropy; 1 = every voxel).", default=1.0)
    empty_crop_dice_volume: float = _flag(
        "Crops without hemorrhage get a Dice term too: the Dice a crop holding a bleed of this fraction of its "
        "voxels, found exactly, would lose to the predicted foreground (0: cross-entropy only).", default=0.0)
    seed: int = _flag("Random seed for data sampling, augmentation and initialisation.", default=42)
    device: str = _flag("Compute device.", default="auto", choices=DEVICES)
    val_every: int = _flag("Validate every N epochs.", default=1)
    false_positive_mining_every: int = _flag(
        "With --false_positive_crop_fraction: a prompt-free pass of the current model over the training scans at "
        "the start of every N-th epoch (not the first) finds the voxels its crops are centred on.", default=25,
        metavar="N")
    max_steps_per_epoch: int | None = _flag("Cap micro-batches per epoch (quick experiments).", default=None)
    resume: str | None = _flag("Resume: 'auto' (latest_model.pth in output_dir if present) or a checkpoint path.",
                               default=None)
    overwrite: bool = _flag("Replace the run already in --output_dir (its checkpoints, metrics and summaries are "
                            "deleted first); without it such a folder needs --resume.", default=False)
    save_every: int = _flag("Also keep an epoch snapshot every N epochs (0: only latest and best).", default=0)
    keep_checkpoints: int = _flag("Number of epoch snapshots to keep when --save_every is set.", default=3)
    max_nonfinite_steps: int = _flag("Abort after this many consecutive non-finite losses.", default=5)
    compile: bool = _flag("Wrap the model in torch.compile (GPU).", default=False)
    fold: str = _flag("With --folds_dir: the fold to train (0, 1, ...) or 'all', one after the other.",
                      default="all")


@dataclass(frozen=True)
class LogConfig:
    """Experiment tracking and pictures."""

    use_wandb: bool = _flag("Log to Weights & Biases (offline automatically without API key or network).",
                            default=False)
    wandb_project: str = _flag("wandb project.", default="ichseg")
    wandb_entity: str | None = _flag("wandb entity (user or team).", default=None)
    log_images: bool = _flag("Save validation overlays as PNG (and to wandb) every --log_freq epochs.",
                             default=False)
    log_freq: int = _flag("Epochs between image logs.", default=5)


@dataclass(frozen=True)
class Config:
    """The whole run: one immutable object, saved verbatim to config.json and into every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    test: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Rebuild from ``to_dict`` output (config.json or a checkpoint); unknown keys are an error."""
        sections = {}
        for section in _SECTIONS:
            values = {**_ABSENT_FROM_OLDER_CONFIGS.get(section.name, {}), **raw.get(section.name, {})}
            known = {f.name: f for f in dataclasses.fields(section.type_)}
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ConfigError([f"unknown {section.name} settings in saved config: {', '.join(unknown)}"])
            hints = get_type_hints(section.type_)
            for key, value in values.items():
                if isinstance(value, list):
                    values[key] = tuple(value)
                elif value is not None and hints[key] is float and isinstance(value, int):
                    values[key] = float(value)
            sections[section.name] = section.type_(**values)
        return cls(**sections, test=bool(raw.get("test", False)))

    def resolve_defaults(self) -> "Config":
        """Settings whose command-line default is "auto" (or unset), decided from the others, once:

        - ``pretrained_checkpoint``: auto -> ``turbo`` for sam_med3d_turbo, none for tiny; ``none`` -> None.
        - ``normalization``: auto -> ``sam_med3d`` for sam_med3d_turbo with pretrained weights, else ``zscore``.
        - ``decoder_lr_scale``: unset -> 0.1 with pretrained weights, 1.0 from scratch.
        The result is what config.json and every checkpoint record.
        """
        m, d, t = self.model, self.data, self.train
        weights = m.pretrained_checkpoint
        if weights == "auto":
            weights = CHECKPOINT_DEFAULTS.get(m.name)
        elif weights is not None and weights.lower() == "none":
            weights = None
        normalization = d.normalization
        if normalization == "auto":
            normalization = "sam_med3d" if (m.name == "sam_med3d_turbo" and weights is not None) else "zscore"
        scale = t.decoder_lr_scale
        if scale is None:
            scale = PRETRAINED_DECODER_LR_SCALE if weights is not None else 1.0
        return dataclasses.replace(
            self, model=dataclasses.replace(m, pretrained_checkpoint=weights),
            data=dataclasses.replace(d, normalization=normalization),
            train=dataclasses.replace(t, decoder_lr_scale=scale))

    def validate(self) -> list[str]:
        """Raise ConfigError listing every impossible setting; return warnings for risky ones."""
        problems: list[str] = []
        warnings: list[str] = []
        d, m, t, lg = self.data, self.model, self.train, self.log

        if not self.test:
            # With --folds_dir each fold's train/val CSVs come from the splits (crossval.fold_config).
            required = {"mask_dir": d.mask_dir} if d.folds_dir else {"train_csv": d.train_csv,
                                                                    "val_csv": d.val_csv, "mask_dir": d.mask_dir}
            for name, value in required.items():
                if value is None:
                    problems.append(f"--{name} is required (or use --test for the synthetic self-check)")
            for name, path in (("train_csv", d.train_csv), ("val_csv", d.val_csv)):
                if path is not None and not Path(path).is_file():
                    problems.append(f"--{name} {path}: file not found")
            if d.mask_dir is not None and not Path(d.mask_dir).is_dir():
                problems.append(f"--mask_dir {d.mask_dir}: folder not found")
        positive = {"batch_size": t.batch_size, "epochs": t.epochs,
                    "gradient_accumulation_steps": t.gradient_accumulation_steps, "val_every": t.val_every,
                    "false_positive_mining_every": t.false_positive_mining_every,
                    "click_rounds": t.click_rounds, "visual_tokens": m.visual_tokens, "log_freq": lg.log_freq,
                    "max_nonfinite_steps": t.max_nonfinite_steps, "step_size": t.step_size,
                    "patience": t.patience}
        for name, value in positive.items():
            if value < 1:
                problems.append(f"--{name} must be >= 1, got {value}")
        if t.max_steps_per_epoch is not None and t.max_steps_per_epoch < 1:
            problems.append(f"--max_steps_per_epoch must be >= 1, got {t.max_steps_per_epoch}")
        for name, value in (("lr", t.lr), ("decoder_lr_scale", t.decoder_lr_scale), ("scratch_lr", t.scratch_lr)):
            if value is None or not value > 0:
                problems.append(f"--{name} must be > 0, got {value}")
        for name, value in (("weight_decay", t.weight_decay), ("max_grad_norm", t.max_grad_norm),
                            ("ich_loss_weight", t.ich_loss_weight), ("decoder_loss_weight", t.decoder_loss_weight),
                            ("warmup_epochs", t.warmup_epochs),
                            ("save_every", t.save_every), ("keep_checkpoints", t.keep_checkpoints)):
            if value < 0:
                problems.append(f"--{name} must be >= 0, got {value}")
        if not 1 <= t.final_hemorrhage_weight <= MAX_HEMORRHAGE_WEIGHT:
            problems.append(f"--final_hemorrhage_weight must be in [1, {MAX_HEMORRHAGE_WEIGHT:g}], got "
                            f"{t.final_hemorrhage_weight}")
        if not 0 < t.hard_voxel_fraction <= 1:
            problems.append(f"--hard_voxel_fraction must be in (0, 1], got {t.hard_voxel_fraction}")
        if not 0 <= t.empty_crop_dice_volume <= 1:
            problems.append(f"--empty_crop_dice_volume must be in [0, 1], got {t.empty_crop_dice_volume}")
        if not 0 < t.lr_decay_factor < 1:
            problems.append(f"--lr_decay_factor must be in (0, 1), got {t.lr_decay_factor}")
        for name, value in (("positive_crop_fraction", d.positive_crop_fraction),
                            ("hard_negative_crop_fraction", d.hard_negative_crop_fraction),
                            ("hard_case_fraction", d.hard_case_fraction),
                            ("false_positive_crop_fraction", d.false_positive_crop_fraction),
                            ("augmentation_prob", d.augmentation_prob),
                            ("lesion_paste_prob", d.lesion_paste_prob),
                            ("lesion_paste_into_negatives", d.lesion_paste_into_negatives),
                            ("lesion_paste_at_bone", d.lesion_paste_at_bone),
                            ("streak_augmentation_prob", d.streak_augmentation_prob)):
            if not 0.0 <= value <= 1.0:
                problems.append(f"--{name} must be in [0, 1], got {value}")
        if not 0 <= d.in_plane_rotation_deg <= 180:
            problems.append(f"--in_plane_rotation_deg must be in [0, 180], got {d.in_plane_rotation_deg}")
        if not 0 <= d.scale_augmentation < 1:
            problems.append(f"--scale_augmentation must be in [0, 1), got {d.scale_augmentation}")
        if d.num_workers is not None and d.num_workers < 0:
            problems.append(f"--num_workers must be >= 0, got {d.num_workers}")
        for name, spacing in (("spacing", d.spacing), ("target_spacing", d.target_spacing)):
            if any(not s > 0 for s in spacing):
                problems.append(f"--{name} values must be > 0 mm, got {' '.join(map(str, spacing))}")
        if not d.hu_window[0] < d.hu_window[1]:
            problems.append(f"--hu_window needs low < high, got {d.hu_window[0]} {d.hu_window[1]}")
        if m.pretrained_checkpoint not in (None, "turbo", "auto") and not Path(m.pretrained_checkpoint).is_file():
            problems.append(f"--pretrained_checkpoint {m.pretrained_checkpoint}: file not found "
                            "(pass a local .pth path, 'turbo', or 'none' to train from scratch)")
        problems += component_filter_problems(m.min_component_ml, m.min_component_peak)
        if m.freeze_encoder and m.pretrained_checkpoint is None:
            problems.append("--freeze_encoder needs pretrained weights: without them it would freeze (and export) a "
                            "randomly initialised encoder; drop --pretrained_checkpoint none or --freeze_encoder")
        if d.normalization == "auto":
            problems.append("--normalization auto must be resolved first (Config.resolve_defaults)")
        if t.overwrite and t.resume is not None:
            problems.append(f"--overwrite and --resume {t.resume} contradict each other: resume the run or replace it")
        problems += _fold_problems(d, t)
        if t.resume not in (None, "auto") and not Path(t.resume).is_file():
            problems.append(f"--resume {t.resume}: file not found (pass a checkpoint path or 'auto')")
        if problems:
            raise ConfigError(problems)

        if t.use_mixed_precision and t.device == "cpu":
            warnings.append("--use_mixed_precision has no effect on CPU: bf16 autocast is far slower than fp32 there")
        if t.patience >= t.epochs:
            warnings.append(f"--patience {t.patience} >= --epochs {t.epochs}: early stopping can never trigger")
        effective = t.batch_size * t.gradient_accumulation_steps
        if effective > 128:
            warnings.append(f"effective batch {effective} (batch_size x accumulation) is unusually large for "
                            "fine-tuning; consider a smaller --gradient_accumulation_steps")
        if t.lr > 1e-3 and m.pretrained_checkpoint is not None:
            warnings.append(f"--lr {t.lr} is high for fine-tuning a pretrained model (typical: 1e-5 .. 2e-4)")
        if m.name == "sam_med3d_turbo" and m.pretrained_checkpoint is None and not self.test:
            warnings.append("training sam_med3d_turbo from scratch (--pretrained_checkpoint none): 100M parameters "
                            "without the published weights need far more data than fine-tuning")
        if d.normalization == "sam_med3d" and tuple(d.hu_window) != DataConfig().hu_window:
            warnings.append("--hu_window is not used by --normalization sam_med3d (it clamps to -1000..1000 HU, as "
                            "SAM-Med3D was pretrained)")
        if t.scheduler_type == "cosine" and t.warmup_epochs >= t.epochs:
            warnings.append(f"--warmup_epochs {t.warmup_epochs} >= --epochs {t.epochs}: the run never leaves warm-up")
        return warnings

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")


def _fold_problems(d: DataConfig, t: TrainConfig) -> list[str]:
    """Cross-validation flags that cannot work together (which folds exist is checked by crossval)."""
    if d.folds_dir is None:
        return [] if t.fold == "all" else [f"--fold {t.fold} needs --folds_dir (the folder splits.py wrote)"]
    problems = []
    if not Path(d.folds_dir).is_dir():
        problems.append(f"--folds_dir {d.folds_dir}: folder not found (write it with splits.py)")
    for name, value in (("train_csv", d.train_csv), ("val_csv", d.val_csv)):
        if value is not None:
            problems.append(f"--{name} and --folds_dir exclude each other: each fold's CSVs come from --folds_dir")
    if t.fold != "all" and not t.fold.isdigit():
        problems.append(f"--fold must be 'all' or a fold number (0, 1, ...), got {t.fold!r}")
    if t.resume not in (None, "auto"):
        problems.append(f"--resume {t.resume}: with --folds_dir use --resume auto (each fold resumes from its "
                        "own latest_model.pth)")
    return problems


@dataclass(frozen=True)
class _Section:
    name: str
    type_: type
    title: str


_SECTIONS = (
    _Section("data", DataConfig, "data and preprocessing"),
    _Section("model", ModelConfig, "model"),
    _Section("train", TrainConfig, "training"),
    _Section("log", LogConfig, "logging and tracking"),
)


def _add_field_argument(group: argparse._ArgumentGroup, section: str, f: dataclasses.Field, hint: Any) -> None:
    meta = f.metadata
    flag = "--" + (meta.get("flag") or f.name)
    dest = f"{section}.{f.name}"
    default = f.default if meta.get("cli_default", dataclasses.MISSING) is dataclasses.MISSING else meta["cli_default"]
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": meta["help"]}
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    elif not meta.get("choices") and hint is not bool:
        kwargs["metavar"] = f.name.upper()
    base = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is not None else [hint]
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        kwargs["help"] += f" (default: {'on' if default else 'off'})"
    elif get_origin(hint) is tuple:
        kwargs["type"] = float
        kwargs["nargs"] = len(get_args(hint))
        kwargs["help"] += f" (default: {' '.join(map(str, default))})"
    else:
        scalar = base[0] if base else str
        kwargs["type"] = scalar
        if default is not None:
            kwargs["help"] += f" (default: {default})"
    group.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune SAM-Med3D to segment intracranial hemorrhage on brain CT.",
    )
    parser.add_argument("--test", action="store_true",
                        help="Quick self-check. With --train_csv/--val_csv/--mask_dir: check YOUR run in a minute "
                             "or two (cohort, model and weights, a few training steps, one validation window, "
                             "memory, epoch time; only selftest_report.json is written to --output_dir). Without: "
                             "train the tiny model on a generated synthetic cohort. Reports PASS/FAIL/SKIP.")
    for section in _SECTIONS:
        group = parser.add_argument_group(section.title)
        hints = get_type_hints(section.type_)
        for f in dataclasses.fields(section.type_):
            _add_field_argument(group, section.name, f, hints[f.name])
    return parser


def build_config(argv: Sequence[str] | None = None) -> tuple[Config, list[str]]:
    """Parse ``argv`` into a validated Config; returns it with the list of warnings.

    Raises ConfigError for impossible settings (the CLI turns it into exit code 2).
    """
    namespace = vars(build_parser().parse_args(argv))
    sections = {}
    for section in _SECTIONS:
        prefix = section.name + "."
        values = {key[len(prefix):]: value for key, value in namespace.items() if key.startswith(prefix)}
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
        sections[section.name] = section.type_(**values)
    config = Config(**sections, test=namespace["test"]).resolve_defaults()
    return config, config.validate()


def replace_section(config: Config, section: str, **changes: Any) -> Config:
    """A copy of ``config`` with some fields of one section changed (the config itself stays frozen)."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})
