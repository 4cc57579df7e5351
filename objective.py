"""What one training step computes: the prompted forward (a prompt-free round, then simulated click rounds with
mask feedback, as interactive inference does) and the segmentation loss.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from config import MAX_HEMORRHAGE_WEIGHT
from inference import interior_depth, mask_prompt_from_logits


def hemorrhage_weight_cap(epoch: int, total_epochs: int, final: float) -> float:
    """The cap on the hemorrhage weight for ``epoch`` (0-based): MAX_HEMORRHAGE_WEIGHT at the first epoch, falling
    linearly to ``final`` at the last (a one-epoch run gets ``final``)."""
    progress = epoch / (total_epochs - 1) if total_epochs > 1 else 1.0
    return MAX_HEMORRHAGE_WEIGHT + (final - MAX_HEMORRHAGE_WEIGHT) * min(max(progress, 0.0), 1.0)


def sample_clicks(target: torch.Tensor, prediction: torch.Tensor | None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One simulated click per sample, drawn from the current error region, favouring its interior.

    A voxel's chance grows with the square of its depth inside the error region (distance to the region's border),
    which is where validation and users click (``inference.next_click``: the deepest voxel of the largest error):
    uniform draws mostly hit the one-voxel rims of nearly right answers, and a model trained on those learned to
    answer a click deep inside a missed bleed with a rim-sized blob.

    Args:
        target: B×1×D×H×W ground truth in {0, 1}.
        prediction: B×1×D×H×W boolean prediction of the previous round, or None before the first round
            (then the error region is the whole hemorrhage: the first click is a positive point inside it).
        generator: CPU generator; its state is checkpointed so resumed runs draw the same clicks.
    Returns:
        points B×1×3 float (d, h, w voxel coordinates) and labels B×1 long: 1 where the click falls on missed
        hemorrhage (false negative), 0 on a false positive. A sample with no error (perfect, or an empty target
        before any prediction) gets a negative click on a random background voxel.
    """
    truth = target[:, 0] > 0.5
    errors = truth.clone() if prediction is None else truth ^ prediction[:, 0].bool()
    batch, spatial = truth.shape[0], truth.shape[1:]
    has_error = errors.flatten(1).any(dim=1)
    has_background = (~truth).flatten(1).any(dim=1)
    # No error: a background click; a crop that is all hemorrhage and predicted so gets one inside it.
    fallback = torch.where(has_background.view(-1, 1, 1, 1), ~truth, truth)
    regions = torch.where(has_error.view(-1, 1, 1, 1), errors, fallback)
    weights = squared_depth(regions).flatten(1).double()
    # Inverse-CDF sampling on the crops' device: one uniform number per sample from the CPU generator keeps the
    # draws reproducible, and no B×S³ weight array travels to the host (torch.multinomial needs both on one device).
    uniforms = torch.rand(batch, 1, generator=generator, dtype=torch.float64).to(weights.device)
    cumulative = weights.cumsum(dim=1)
    # The first index whose cumulative weight exceeds u·total: always a voxel with positive weight (in the region).
    index = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True).clamp_(max=weights.shape[1] - 1)
    points = torch.stack(torch.unravel_index(index[:, 0], spatial), dim=1).float().unsqueeze(1)
    labels = truth.flatten(1).gather(1, index).long()
    return points, labels


def squared_depth(regions: torch.Tensor) -> torch.Tensor:
    """B×D×H×W boolean regions → squared Euclidean distance of every region voxel to the nearest voxel outside its
    region, the volume's edge counting as outside (0 outside the region).

    On a CPU, ``inference.interior_depth`` (scipy's transform in each region's bounding box). On a GPU, an exact
    separable transform in torch instead (hand-written: MONAI's GPU transform needs cuCIM, which is not a
    dependency, and scipy's host round-trip took ~0.3 s of one core per 128³ crop, most of an H200 training step:
    bench/results/gpu_check_nvidia_h200.md).
    """
    if regions.device.type != "cpu":
        return _separable_squared_depth(regions)
    # float32 before squaring, as the benchmarks were measured (the draws depend on the last bit of the weights).
    return torch.from_numpy(np.stack([interior_depth(region).astype(np.float32) ** 2 for region in regions.numpy()]))


# Elements of the B·n² (row, offset) table held at once by the separable transform: ~256 MB of float32.
_SEPARABLE_CHUNK_ELEMENTS = 64 * 2**20


def _separable_squared_depth(regions: torch.Tensor) -> torch.Tensor:
    """The exact squared distance transform as three 1-D passes (one per axis), each a brute-force lower envelope
    of parabolas: f'(x) = min_y f(y) + (x − y)², starting from 0 outside the region and a large value inside."""
    padded = F.pad(regions.float(), (1, 1, 1, 1, 1, 1))  # a zero shell: the volume's edge is outside the region
    larger_than_any_distance = float(sum(padded.shape[1:]) ** 2)
    distance = padded * larger_than_any_distance
    for dim in (3, 2, 1):
        distance = _lower_envelope(distance.movedim(dim, -1)).movedim(-1, dim)
    return distance[:, 1:-1, 1:-1, 1:-1].contiguous()


def _lower_envelope(values: torch.Tensor) -> torch.Tensor:
    """min over y of values[..., y] + (x − y)², for every x of the last dimension."""
    n = values.shape[-1]
    positions = torch.arange(n, device=values.device, dtype=values.dtype)
    offsets = (positions[:, None] - positions[None, :]) ** 2  # [x, y]
    rows = values.reshape(-1, n)
    out = torch.empty_like(rows)
    step = max(1, _SEPARABLE_CHUNK_ELEMENTS // (n * n))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        out[start:start + step] = (chunk[:, None, :] + offsets[None]).amin(dim=-1)
    return out.reshape(values.shape)


# --------------------------------------------------------------------------------------------------------------
# The forward used for training: one encoder pass, several decoder rounds, inside one module call so that a
# DistributedDataParallel wrapper sees a single forward (its gradient hooks are armed per forward call).
# --------------------------------------------------------------------------------------------------------------

class PromptedSegmentation(nn.Module):
    """Wraps a SamMed3D for training: prompt-free decoding, optionally followed by click rounds reusing the features.

    Every batch starts with the prompt-free answer (no points, the all-zero mask prompt the published weights were
    trained with). Click rounds then correct it the way a user does with ``predict.py --points``: a click on the
    current error, all clicks so far as point prompts, and the current answer as the mask prompt
    (``inference.mask_prompt_from_logits``, the same conversion interactive inference uses).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, click_rounds: int,
                generator: torch.Generator) -> dict[str, Any]:
        """images, labels: B×1×S×S×S. Returns ``masks`` (list of B×1×S×S×S logits: the prompt-free round, then one
        per click round), ``coarse_masks`` (the same rounds before refinement) and ``ich_logit`` (B).
        ``click_rounds == 0`` is the automatic, prompt-free mode."""
        features = self.model.encode(images)
        # The representation head learns on detached features: with its ICH loss flowing into the encoder the
        # tiny model stayed on the empty-mask plateau in every run we measured, so segmentation alone shapes the
        # encoder and the head reads it the way BLIP-2's Q-Former will.
        represented = self.model.represent(features.detach())
        first = self.model.decode(features, image=images)
        masks, coarse_masks = [first["masks"]], [first["coarse_masks"]]
        points = point_labels = None
        for _ in range(click_rounds):
            # The next round corrects this round's answer; the prompt itself carries no gradient, as in SAM.
            previous = masks[-1].detach()
            new_points, new_labels = sample_clicks(labels, previous > 0, generator)
            points = new_points if points is None else torch.cat([points, new_points], dim=1)
            point_labels = new_labels if point_labels is None else torch.cat([point_labels, new_labels], dim=1)
            prompt = mask_prompt_from_logits(previous, self.model.mask_size)
            decoded = self.model.decode(features, points=points, point_labels=point_labels, mask_prompt=prompt,
                                        image=images)
            masks.append(decoded["masks"])
            coarse_masks.append(decoded["coarse_masks"])
        return {"masks": masks, "coarse_masks": coarse_masks, "ich_logit": represented["ich_logit"]}


class SegmentationLoss(nn.Module):
    """Dice (MONAI) + class-balanced binary cross-entropy on mask logits, averaged over prompt rounds, plus
    weighted BCE on the ICH-presence logit, plus (``decoder_weight``) the same mask loss on the decoder's own,
    unrefined masks (deep supervision, see ``TrainConfig.decoder_loss_weight``; without a refiner they are the
    masks themselves, so the term only scales the mask loss).

    ``hard_voxel_fraction`` < 1 averages the weighted cross-entropy over only that fraction of each sample's voxels,
    those with the largest loss, as nnU-Net's TopK loss does: a thin rim of missed blood is a few hundred voxels
    among 64³, and averaged over all of them its gradient is diluted by the background the model already gets
    right. The hemorrhage weight stays: TopK without it (nnU-Net's form) left multifocal's subdurals unfound.

    Both terms are computed per sample and then averaged, so accumulating micro-batches equals one big batch.
    Soft Dice is undefined on an empty target (any non-zero sigmoid gives a loss near 1), so for samples without
    hemorrhage only the cross-entropy term applies; it still punishes every false-positive voxel. With
    ``empty_crop_dice_volume`` v > 0 they get F / (2V + F) in its place (F the summed sigmoid, V = v × voxels): the
    Dice a crop holding V voxels of bleed, found exactly, would lose to F. Averaged over a few hard voxels, the
    cross-entropy of a crop without blood is a weak voice next to Dice on the crops with it; this gives a false
    positive the same price on both (measured with hyperdense crops: a streak negative's 21 / 5.5 / 4.7 mL became
    1.1 / 3.5 / 3.0 mL over three seeds). The ICH target is crop-level: 1 when the crop contains any hemorrhage voxel.
    """

    def __init__(self, ich_weight: float, decoder_weight: float = 0.0, hard_voxel_fraction: float = 1.0,
                 empty_crop_dice_volume: float = 0.0):
        super().__init__()
        if not 0.0 < hard_voxel_fraction <= 1.0:
            raise ValueError(f"hard_voxel_fraction must be in (0, 1], got {hard_voxel_fraction}")
        if not 0.0 <= empty_crop_dice_volume <= 1.0:
            raise ValueError(f"empty_crop_dice_volume must be in [0, 1], got {empty_crop_dice_volume}")
        self.hard_voxel_fraction = hard_voxel_fraction
        # The trainer lowers it epoch by epoch with --final_hemorrhage_weight (hemorrhage_weight_cap).
        self.hemorrhage_weight_cap = MAX_HEMORRHAGE_WEIGHT
        self.empty_crop_dice_volume = empty_crop_dice_volume
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.ich_weight = ich_weight
        self.decoder_weight = decoder_weight

    def mask_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over samples of BCE + Dice·[target not empty]; logits, labels: B×1×D×H×W."""
        return self.sample_mask_loss(logits, labels).mean()

    def sample_mask_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``mask_loss`` per sample: (B,)."""
        logits = logits.float()
        voxel_bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").flatten(1)
        target = labels.flatten(1)
        # Hemorrhage is ~1% of a crop: weight its voxels towards half the cross-entropy (capped) so the loss does
        # not settle on the all-empty answer, where the sigmoid saturates and the Dice gradient vanishes.
        balancing = target.shape[1] / (2 * target.sum(dim=1).clamp(min=1))
        positive_weight = balancing.clamp(max=self.hemorrhage_weight_cap)
        weighted_bce = voxel_bce * torch.where(target > 0.5, positive_weight[:, None], 1.0)
        if self.hard_voxel_fraction < 1.0:
            hardest = max(1, round(self.hard_voxel_fraction * weighted_bce.shape[1]))
            weighted_bce = weighted_bce.topk(hardest, dim=1, sorted=False).values
        bce = weighted_bce.mean(dim=1)
        dice = self.dice(logits, labels).flatten(1).mean(dim=1)
        has_target = labels.flatten(1).amax(dim=1) > 0.5
        if self.empty_crop_dice_volume > 0:
            # 1 - Dice of a crop holding V voxels of bleed, found exactly, plus the predicted foreground F:
            # F / (2V + F). Its gradient per false-positive voxel, ~1/(2V), matches what Dice puts on a positive crop.
            foreground = torch.sigmoid(logits.float()).flatten(1).sum(dim=1)
            reference = 2 * self.empty_crop_dice_volume * target.shape[1]
            return bce + torch.where(has_target, dice, foreground / (foreground + reference))
        return bce + dice * has_target.float()

    def forward(self, masks: list[torch.Tensor], ich_logit: torch.Tensor | None, labels: torch.Tensor,
                coarse_masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """(total loss, parts): ``parts`` holds each term as a float and ``sample_mask_loss``, the mask loss of
        each sample (a detached (B,) tensor; hard-case sampling ranks scans by it)."""
        sample_mask_loss = torch.stack([self.sample_mask_loss(m, labels) for m in masks]).mean(dim=0)
        mask_loss = sample_mask_loss.mean()
        total = mask_loss
        parts: dict[str, Any] = {"mask_loss": float(mask_loss.detach()), "sample_mask_loss": sample_mask_loss.detach()}
        if coarse_masks is not None and self.decoder_weight > 0:
            decoder_loss = torch.stack([self.mask_loss(m, labels) for m in coarse_masks]).mean()
            total = total + self.decoder_weight * decoder_loss
            parts["decoder_loss"] = float(decoder_loss.detach())
        if ich_logit is not None and self.ich_weight > 0:
            ich_target = (labels.flatten(1).amax(dim=1) > 0.5).float()
            ich_loss = F.binary_cross_entropy_with_logits(ich_logit.float(), ich_target)
            total = total + self.ich_weight * ich_loss
            parts["ich_loss"] = float(ich_loss.detach())
        return total, parts
