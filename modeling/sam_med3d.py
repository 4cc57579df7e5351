"""The assembled SAM-Med3D model: ``encode`` once, ``decode`` as many prompt rounds as needed, ``represent`` for
the BLIP-2 path, or ``forward`` for all of it in one call.

Sizes: S = ``img_size`` (input side), g = S / patch (token grid, 8 for both builds), C = encoder output channels,
L = 4·g (low-res mask side, the decoder's 4× upscaling of the token grid: 32 for both builds).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modeling.common import upsample_trilinear
from modeling.image_encoder import ImageEncoderViT3D
from modeling.mask_decoder import MaskDecoder3D
from modeling.prompt_encoder import PromptEncoder3D
from modeling.refiner import MaskRefiner3D
from modeling.representation_head import RepresentationHead
from modeling.validation import check_features, check_mask_prompt, check_points, check_refiner_image


class SamMed3D(nn.Module):
    """Promptable 3-D segmentation (SAM-Med3D) plus a representation head.

    Attributes: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``, ``representation_head`` (their parameters
    appear under those prefixes in ``state_dict()``), ``img_size`` (S), ``mask_size`` (L), ``visual_tokens``.
    There are no pixel_mean/pixel_std buffers: inputs arrive already normalised by the data pipeline.
    """

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D,
                 representation_head: RepresentationHead, refiner: MaskRefiner3D | None = None) -> None:
        super().__init__()
        if prompt_encoder.embed_dim != image_encoder.num_features:
            raise ValueError(f"prompt encoder width {prompt_encoder.embed_dim} must equal the encoder's output "
                             f"channels {image_encoder.num_features}")
        if representation_head.in_features != image_encoder.num_features:
            raise ValueError(f"representation head expects {representation_head.in_features} input channels, the "
                             f"encoder produces {image_encoder.num_features}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.representation_head = representation_head
        # Optional (``refiner.*`` keys only when present): high-resolution refinement of the decoder's masks.
        self.refiner = refiner
        self.img_size: int = image_encoder.img_size
        self.mask_size: int = prompt_encoder.mask_input_size
        self.visual_tokens: int = representation_head.visual_tokens

    @property
    def encoder_config(self) -> dict[str, Any]:
        """Everything needed to rebuild the image encoder: ``ImageEncoderViT3D(**model.encoder_config)``."""
        return self.image_encoder.config

    # ---------------------------------------------------------------- switches
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute encoder blocks during backward (less activation memory, ~one more encoder forward)."""
        self.image_encoder.gradient_checkpointing = bool(enabled)

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze (requires_grad False) or unfreeze the image encoder; the other parts stay trainable."""
        for p in self.image_encoder.parameters():
            p.requires_grad_(not frozen)

    # ---------------------------------------------------------------- API
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: B×1×S×S×S float (validated; ValueError otherwise) -> features B×C×g×g×g.

        Compute once per batch and pass to ``decode`` for every prompt round (iterative click training).
        """
        return self.image_encoder(images)

    def decode(self, features: torch.Tensor, points: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None, mask_prompt: torch.Tensor | None = None,
               multimask_output: bool = False, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Segment from encoder features and prompts.

        Args:
            features: B×C×g×g×g from ``encode`` (reusable across rounds; gradients flow back through it).
            points: B×P×3 float voxel coordinates in (D, H, W) order of the model input, each in [0, S), or None.
            point_labels: B×P integer: 1 positive, 0 negative, -1 padding (coordinates ignored), or None.
            mask_prompt: B×1×L×L×L low-res logits (e.g. the previous round's ``low_res_masks``), or None for "no
                mask yet", which is fed as an all-zero mask prompt (see below).
            multimask_output: False (default): SAM's single-mask output. True: the decoder's three multimask
                outputs are computed; ``masks``/``low_res_masks``/``iou_predictions`` hold the one with the highest
                predicted IoU per sample, and ``multimask_low_res_masks`` B×3×L³ / ``multimask_iou_predictions``
                B×3 hold all three.
            image: B×1×S×S×S, the input ``features`` were computed from; required when the model has a refiner
                (``masks`` are then refined at full resolution from the image;
                ``low_res_masks`` stay the decoder's own).

        "No mask" is an all-zero low-res mask through the mask-downscaling convs, exactly what SAM-Med3D's own
        training fed its first round: the prompt encoder's ``no_mask_embed`` was never trained in the published
        weights (it is still its random initialisation there), so it is not used. Without points there are no
        sparse tokens (prompt-free, automatic segmentation); a sample whose labels are all -1 gets only
        not-a-point tokens.

        Returns: dict(masks=B×1×S×S×S logits (trilinear upsampling of low_res_masks, refined when the model has a
        refiner), coarse_masks=B×1×S×S×S (the same before refinement: the decoder's own answer),
        low_res_masks=B×1×L×L×L logits, iou_predictions=B×1).
        """
        b = features.shape[0] if isinstance(features, torch.Tensor) and features.ndim > 0 else 0
        check_features(features, self.image_encoder.num_features, self.image_encoder.grid_size)
        check_points(points, point_labels, b, self.img_size)
        check_mask_prompt(mask_prompt, b, self.mask_size)
        if self.refiner is not None:
            check_refiner_image(image, b, self.img_size)
        if points is not None and points.shape[1] == 0:
            points = point_labels = None  # an empty click list is no click at all
        if mask_prompt is None:
            mask_prompt = features.new_zeros(b, 1, self.mask_size, self.mask_size, self.mask_size)
        sparse, dense = self.prompt_encoder(points, point_labels, mask_prompt, batch_size=b)
        low_res_all, iou_all = self.mask_decoder(features, self.prompt_encoder.get_dense_pe(), sparse, dense)
        out: dict[str, torch.Tensor] = {}
        if multimask_output:
            multi_masks, multi_iou = low_res_all[:, 1:], iou_all[:, 1:]
            best = multi_iou.argmax(dim=1)
            rows = torch.arange(b, device=best.device)
            low_res, iou = multi_masks[rows, best].unsqueeze(1), multi_iou[rows, best].unsqueeze(1)
            out["multimask_low_res_masks"] = multi_masks
            out["multimask_iou_predictions"] = multi_iou
        else:
            low_res, iou = low_res_all[:, :1], iou_all[:, :1]
        coarse = upsample_trilinear(low_res, self.img_size)
        out["masks"] = self.refiner(image, coarse) if self.refiner is not None else coarse
        out["coarse_masks"] = coarse
        out["low_res_masks"] = low_res
        out["iou_predictions"] = iou
        return out

    def represent(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features B×C×g×g×g -> dict(tokens=B×N×visual_tokens, ich_logit=B), N = g³ in (D, H, W) row-major order."""
        check_features(features, self.image_encoder.num_features, self.image_encoder.grid_size)
        return self.representation_head(features.flatten(2).transpose(1, 2))

    def forward(self, images: torch.Tensor, points: torch.Tensor | None = None,
                point_labels: torch.Tensor | None = None, mask_prompt: torch.Tensor | None = None,
                multimask_output: bool = False) -> dict[str, torch.Tensor]:
        """One pass: encode, decode with the given prompts, represent.

        Returns the keys of ``decode`` and ``represent`` plus ``features`` (B×C×g×g×g).
        """
        features = self.encode(images)
        out = self.decode(features, points, point_labels, mask_prompt, multimask_output, image=images)
        out.update(self.represent(features))
        out["features"] = features
        return out
