"""The BLIP-2 export: the fine-tuned image encoder and representation head as one plain-data file.

``export_encoder(model)`` returns a dict of tensors, numbers, strings and lists (loadable with
``torch.load(weights_only=True)``); the trainer adds ``preprocessing`` and provenance keys and saves it as
``sam_encoder.pth``. ``load_sam_encoder(path)`` rebuilds the encoder from that file alone, as a module a BLIP-2
model can use as its ``visual_encoder``: volumes B×1×S×S×S -> tokens B×N×C (N = g³ spatial positions in
row-major (D, H, W) order, C = ``num_features``). ``load_representation_head(path)`` maps those tokens to visual
tokens and the ICH logit. Both reuse the training classes, so their numbers are bit-identical to the model's.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeling.checkpoint import (CheckpointError, CheckpointMismatchError, as_state_dict, diff_state_dicts,
                                 read_checkpoint, unwrap_model)
from modeling.image_encoder import ImageEncoderViT3D
from modeling.representation_head import RepresentationHead

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
EXPORT_KEYS = ("format_version", "image_encoder_state_dict", "representation_head_state_dict", "encoder_config",
               "visual_tokens", "num_features", "num_tokens")


class SamVisualEncoder(ImageEncoderViT3D):
    """The SAM-Med3D image encoder as a BLIP-2 ``visual_encoder``.

    Same parameters (and ``state_dict()`` keys) as ``ImageEncoderViT3D``; ``forward`` returns the neck features
    flattened to tokens: B×1×S×S×S -> B×N×C with N = g³ and ``num_features`` = C.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).flatten(2).transpose(1, 2)


def export_encoder(model: nn.Module, path_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Plain-data snapshot of a SamMed3D's image encoder and representation head.

    Keys: ``format_version``; ``image_encoder_state_dict`` (keys exactly those of
    ``model.image_encoder.state_dict()``, CPU copies); ``representation_head_state_dict``; ``encoder_config``
    (the ImageEncoderViT3D constructor arguments: img_size, patch_size, in_chans, embed_dim, depth, num_heads,
    mlp_ratio, out_chans, window_size, global_attn_indexes); ``visual_tokens``; ``num_features`` (C);
    ``num_tokens`` (N). ``path_extra`` adds further plain-data keys (e.g. preprocessing, provenance) and may not
    overwrite these.
    """
    sam = unwrap_model(model)
    encoder: ImageEncoderViT3D = sam.image_encoder
    head: RepresentationHead = sam.representation_head

    def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
        # Copies, so the payload stays as it is while training goes on.
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    payload: dict[str, Any] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "image_encoder_state_dict": snapshot(encoder),
        "representation_head_state_dict": snapshot(head),
        "encoder_config": encoder.config,
        "visual_tokens": int(head.visual_tokens),
        "num_features": int(encoder.num_features),
        "num_tokens": int(encoder.grid_size ** 3),
    }
    if path_extra:
        clash = sorted(set(path_extra) & set(payload))
        if clash:
            raise ValueError(f"export_encoder: extra keys may not replace the export's own keys {clash}")
        payload.update(path_extra)
    return payload


def _read_export(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    payload = read_checkpoint(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path}: expected an encoder export (a dict with {', '.join(EXPORT_KEYS)}), found "
                              f"{type(payload).__name__}")
    missing = [k for k in EXPORT_KEYS if k not in payload]
    if missing:
        hint = " (this looks like a training checkpoint; the export is sam_encoder.pth)" \
            if "model_state_dict" in payload else ""
        raise CheckpointError(f"{path}: not an encoder export: missing {', '.join(missing)}{hint}")
    if payload["format_version"] != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: export format_version {payload['format_version']!r} is not supported "
                              f"(this code reads version {EXPORT_FORMAT_VERSION})")
    return dict(payload)


def _load_exactly(module: nn.Module, state_dict: Mapping[str, Any], path: Path, what: str) -> None:
    tensors = as_state_dict(state_dict, path, what)
    diff = diff_state_dicts(tensors, module.state_dict())
    if not diff.ok:
        raise CheckpointMismatchError(f"{path}: {what} does not match the architecture in the file's "
                                      f"encoder_config:\n{diff.describe()}")
    module.load_state_dict(tensors, strict=True)


def load_sam_encoder(path: str | Path) -> SamVisualEncoder:
    """Rebuild the exported encoder: a module in eval mode, volumes B×1×S×S×S -> tokens B×N×C.

    Its ``state_dict()`` keys are exactly those of ``image_encoder_state_dict``; ``num_features`` is C.
    """
    path = Path(path).expanduser()
    payload = _read_export(path)
    config = payload["encoder_config"]
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: encoder_config should be a dict, found {type(config).__name__}")
    try:
        encoder = SamVisualEncoder(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: encoder_config does not describe an image encoder ({err})") from err
    _load_exactly(encoder, payload["image_encoder_state_dict"], path, "image_encoder_state_dict")
    if encoder.num_features != payload["num_features"]:
        raise CheckpointError(f"{path}: num_features {payload['num_features']} disagrees with the encoder's "
                              f"output width {encoder.num_features}")
    logger.info("loaded SAM-Med3D encoder from %s: %d tokens × %d features", path, encoder.grid_size ** 3,
                encoder.num_features)
    return encoder.eval()


def load_representation_head(path: str | Path) -> RepresentationHead:
    """Rebuild the exported representation head (eval mode): tokens B×N×C -> dict(tokens B×N×V, ich_logit B)."""
    path = Path(path).expanduser()
    payload = _read_export(path)
    head = RepresentationHead(int(payload["num_features"]), int(payload["visual_tokens"]))
    _load_exactly(head, payload["representation_head_state_dict"], path, "representation_head_state_dict")
    return head.eval()
