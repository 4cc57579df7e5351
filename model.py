"""SAM-Med3D for ichseg: the builder registry, pretrained loading and the BLIP-2 export (public entry point).

The architecture lives in ``modeling/`` (one component per file). This module holds every architecture constant
(the builders below), ``build_model`` — the only constructor the trainer uses — and the checkpoint plumbing:

- ``build_model(config)``: registry lookup, optional pretrained weights, gradient checkpointing, encoder freezing.
- ``load_pretrained(model, path_or_alias, strict=True)``: the published SAM-Med3D-turbo file (``model_state_dict``
  plus a pickled ``args`` Namespace), a bare state dict, or this project's ``best_model.pth``/``latest_model.pth``;
  ``module.`` prefixes are stripped; the alias ``turbo`` resolves through the Hugging Face cache.
- ``load_trained(path)``: (model, config) from one of this project's checkpoints, the one "checkpoint → model"
  (predict.py and the BLIP-2 checks use it; the trainer's resume shares its checks, ``read_trained_checkpoint``).
- ``export_encoder`` / ``load_sam_encoder`` / ``load_representation_head``: the BLIP-2 file (``modeling/export.py``).

Project modules and the published file: SAM-Med3D checkpoints have no ``representation_head.*`` or ``refiner.*``
keys (both are new in this project). When the source is such a file, every published key must match image_encoder,
prompt_encoder and mask_decoder exactly and those modules are reported as initialised fresh; this project's own
checkpoints (they carry ``config``) must match everything, head and refiner included.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import torch
from torch import nn

from config import Config, ModelConfig

from modeling.checkpoint import (CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, as_state_dict,
                                 diff_state_dicts, first_error_line, read_checkpoint, strip_wrapper_prefixes, unwrap_model)
from modeling.export import (EXPORT_FORMAT_VERSION, SamVisualEncoder, export_encoder, load_representation_head,
                             load_sam_encoder)
from modeling.image_encoder import ImageEncoderViT3D
from modeling.mask_decoder import MaskDecoder3D
from modeling.prompt_encoder import PromptEncoder3D
from modeling.refiner import MaskRefiner3D
from modeling.representation_head import RepresentationHead
from modeling.sam_med3d import SamMed3D

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_ALIASES", "EXPORT_FORMAT_VERSION", "MODEL_REGISTRY", "TURBO_CHECKPOINT_URL", "CheckpointError",
    "CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointUnavailableError", "LoadReport", "SamMed3D",
    "SamVisualEncoder", "build_model", "build_sam_med3d_turbo", "build_tiny", "export_encoder", "load_pretrained",
    "load_representation_head", "load_sam_encoder", "load_trained", "load_trained_weights", "model_from_trained",
    "read_trained_checkpoint", "resolve_checkpoint", "trainable_parameters",
]

# ------------------------------------------------------------------------------------------------------------------
# Where the published weights live
# ------------------------------------------------------------------------------------------------------------------

TURBO_CHECKPOINT_URL = "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"


@dataclass(frozen=True)
class HubFile:
    """A file on the Hugging Face Hub, with the URL to give users who must fetch it by hand."""

    repo_id: str
    filename: str
    url: str


CHECKPOINT_ALIASES: dict[str, HubFile] = {
    "turbo": HubFile(repo_id="blueyo0/SAM-Med3D", filename="sam_med3d_turbo.pth", url=TURBO_CHECKPOINT_URL),
}
# Seconds to wait for the Hub's metadata request; an unreachable Hub must fail promptly, not hang a run.
HUB_TIMEOUT_S = 10.0
# Modules this project adds to SAM-Med3D: a published file has none of their keys, so they start fresh.
PROJECT_MODULES = ("representation_head", "refiner")


class CheckpointUnavailableError(CheckpointError):
    """A checkpoint alias cannot be resolved (offline, or the Hub is unreachable); says where to put the file."""


# ------------------------------------------------------------------------------------------------------------------
# Builders: every architecture constant is in this section
# ------------------------------------------------------------------------------------------------------------------

def _build_sam_med3d(*, img_size: int, patch_size: int, encoder_embed_dim: int, encoder_depth: int,
                     encoder_num_heads: int, encoder_window_size: int, encoder_global_attn_indexes: tuple[int, ...],
                     prompt_embed_dim: int, decoder_depth: int, decoder_num_heads: int, decoder_mlp_dim: int,
                     iou_head_hidden_dim: int, visual_tokens: int, refiner: bool) -> SamMed3D:
    """Wire the four parts together; the constants shared by every variant are the SAM(-Med3D) conventions."""
    mlp_ratio = 4.0                 # encoder MLP width = 4 × embed dim
    mask_in_chans = 16              # hidden channels of the mask-prompt downscaling convs
    num_multimask_outputs = 3       # plus one single-mask output
    iou_head_depth = 3
    attention_downsample_rate = 2   # cross attention runs at half the decoder width
    refiner_channels = 16           # width of the high-resolution refinement path (modeling/refiner.py)
    if visual_tokens < 1:
        raise ValueError(f"visual_tokens must be a positive integer, got {visual_tokens}")
    image_encoder = ImageEncoderViT3D(
        img_size=img_size, patch_size=patch_size, in_chans=1, embed_dim=encoder_embed_dim, depth=encoder_depth,
        num_heads=encoder_num_heads, mlp_ratio=mlp_ratio, out_chans=prompt_embed_dim,
        window_size=encoder_window_size, global_attn_indexes=encoder_global_attn_indexes)
    prompt_encoder = PromptEncoder3D(embed_dim=prompt_embed_dim, image_embedding_size=img_size // patch_size,
                                     input_image_size=img_size, mask_in_chans=mask_in_chans)
    mask_decoder = MaskDecoder3D(transformer_dim=prompt_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads,
                                 mlp_dim=decoder_mlp_dim, num_multimask_outputs=num_multimask_outputs,
                                 iou_head_depth=iou_head_depth, iou_head_hidden_dim=iou_head_hidden_dim,
                                 attention_downsample_rate=attention_downsample_rate)
    # Sized from the encoder as built, so another encoder variant gets a matching head without edits.
    representation_head = RepresentationHead.for_encoder(image_encoder, visual_tokens)
    return SamMed3D(image_encoder, prompt_encoder, mask_decoder, representation_head,
                    MaskRefiner3D(refiner_channels) if refiner else None)


def build_sam_med3d_turbo(visual_tokens: int = 256, refiner: bool = True) -> SamMed3D:
    """SAM-Med3D-turbo (upstream registry name ``vit_b_ori``): ViT-B on 128³ volumes, 8³ tokens, width 384 after
    the neck. Loads the published ``sam_med3d_turbo.pth`` with strict=True."""
    return _build_sam_med3d(
        img_size=128, patch_size=16, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
        encoder_window_size=14, encoder_global_attn_indexes=(2, 5, 8, 11), prompt_embed_dim=384,
        decoder_depth=2, decoder_num_heads=8, decoder_mlp_dim=2048, iou_head_hidden_dim=256,
        visual_tokens=visual_tokens, refiner=refiner)


def build_tiny(visual_tokens: int = 256, refiner: bool = True) -> SamMed3D:
    """Same code at toy size for tests and ``train.py --test``: 64³ input, patch 8 (so still an 8³ token grid),
    width 64, one window block (window 12 > grid 8, so the zero-padding path runs) and one global block."""
    return _build_sam_med3d(
        img_size=64, patch_size=8, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
        encoder_window_size=12, encoder_global_attn_indexes=(1,), prompt_embed_dim=48,
        decoder_depth=2, decoder_num_heads=4, decoder_mlp_dim=192, iou_head_hidden_dim=64,
        visual_tokens=visual_tokens, refiner=refiner)


MODEL_REGISTRY: dict[str, Callable[..., SamMed3D]] = {
    "sam_med3d_turbo": build_sam_med3d_turbo,
    "tiny": build_tiny,
}


def build_model(config: ModelConfig) -> SamMed3D:
    """Build ``config.name`` from the registry, load ``config.pretrained_checkpoint`` (strict), then apply
    ``use_gradient_checkpointing`` and ``freeze_encoder``. The only constructor the trainer uses."""
    builder = MODEL_REGISTRY.get(config.name)
    if builder is None:
        raise ValueError(f"unknown model {config.name!r}; choose one of {', '.join(sorted(MODEL_REGISTRY))}")
    model = builder(visual_tokens=config.visual_tokens, refiner=config.mask_refiner)
    if config.pretrained_checkpoint:
        load_pretrained(model, config.pretrained_checkpoint, strict=True)
    model.set_gradient_checkpointing(config.use_gradient_checkpointing)
    if config.freeze_encoder:
        model.set_encoder_frozen(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    logger.info("built %s: %s parameters, %s trainable%s%s", config.name, f"{total:,}", f"{trainable:,}",
                ", encoder frozen" if config.freeze_encoder else "",
                ", gradient checkpointing" if config.use_gradient_checkpointing else "")
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should receive (requires_grad True), in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------------------
# Pretrained weights
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadReport:
    """What ``load_pretrained`` did.

    layout: "published" (SAM-Med3D training file: ``model_state_dict`` without ``config``), "project" (this
    project's checkpoint: ``model_state_dict`` and ``config``) or "state_dict" (a bare state dict).
    initialised_fresh: modules the file has no weights for, kept at their initial values (by design).
    skipped: with strict=False, the differences that were ignored ("" when none).
    """

    path: str
    layout: str
    loaded_tensors: int
    initialised_fresh: tuple[str, ...] = ()
    skipped: str = ""
    sha256: str = ""


def resolve_checkpoint(path_or_alias: str | Path) -> Path:
    """A local checkpoint path, or an alias (``turbo``) resolved through the Hugging Face cache.

    Raises CheckpointNotFoundError for a missing local file, CheckpointUnavailableError when an alias cannot be
    fetched (HF_HUB_OFFLINE set, or the Hub unreachable) — at once, with the URL and where to put the file.
    """
    key = str(path_or_alias)
    if key in CHECKPOINT_ALIASES:
        return _resolve_hub_file(key, CHECKPOINT_ALIASES[key])
    path = Path(key).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"pretrained checkpoint not found: {path} (expected a .pth file, or one of "
                                      f"the aliases {', '.join(sorted(CHECKPOINT_ALIASES))})")
    return path


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub itself reads it once, at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _resolve_hub_file(alias: str, hub: HubFile) -> Path:
    cached = huggingface_hub.try_to_load_from_cache(hub.repo_id, hub.filename)
    if isinstance(cached, str):  # a purely local lookup; works offline too
        logger.info("pretrained checkpoint '%s': %s (Hugging Face cache)", alias, cached)
        return Path(cached)
    advice = (f"Download {hub.url} on a machine with internet access, copy it here (for example to "
              f"./checkpoints/{hub.filename}) and pass that local path instead of '{alias}' "
              f"(--pretrained_checkpoint ./checkpoints/{hub.filename}).")
    if _hub_offline():
        raise CheckpointUnavailableError(
            f"cannot fetch pretrained checkpoint '{alias}': the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) "
            f"and {hub.repo_id}/{hub.filename} is not in the local cache. {advice}")
    logger.info("downloading %s/%s from the Hugging Face Hub", hub.repo_id, hub.filename)
    try:
        return Path(huggingface_hub.hf_hub_download(hub.repo_id, hub.filename, etag_timeout=HUB_TIMEOUT_S))
    except OSError as err:  # huggingface_hub's connection, HTTP and not-found errors all derive from OSError
        raise CheckpointUnavailableError(
            f"cannot fetch pretrained checkpoint '{alias}' from the Hugging Face Hub ({type(err).__name__}: "
            f"{first_error_line(err)}). {advice}") from err


def _extract_state_dict(content: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, layout) from a loaded file; CheckpointError naming the file for anything else."""
    if isinstance(content, dict) and "model_state_dict" in content:
        layout = "project" if "config" in content else "published"
        return as_state_dict(content["model_state_dict"], path, "model_state_dict"), layout
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return as_state_dict(content, path, "the file"), "state_dict"
    found = (f"a dict with keys {sorted(map(str, content))[:10]}" if isinstance(content, dict)
             else f"a {type(content).__name__}")
    raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor) or a dict with "
                          f"'model_state_dict'; found {found}")


def load_pretrained(model: nn.Module, path_or_alias: str | Path, strict: bool = True) -> LoadReport:
    """Load weights into a SamMed3D (or a DDP / compiled wrapper of one) from a file or alias.

    Reads with ``torch.load(weights_only=True, map_location="cpu")`` (argparse.Namespace allow-listed for the
    published file's ``args``). strict=True (default) raises CheckpointMismatchError listing missing keys,
    unexpected keys and shape mismatches (first 20 of each, with counts) and naming the file; strict=False loads
    what matches and logs the rest. A published SAM-Med3D file without a representation head loads strictly into
    image_encoder / prompt_encoder / mask_decoder and the head is reported as initialised fresh (module docstring).
    """
    target = unwrap_model(model)
    path = resolve_checkpoint(path_or_alias)
    state_dict, layout = _extract_state_dict(read_checkpoint(path), path)
    state_dict = strip_wrapper_prefixes(state_dict)

    expected = target.state_dict()
    fresh: tuple[str, ...] = ()
    if layout != "project":
        fresh = tuple(name for name in PROJECT_MODULES
                      if any(k.startswith(f"{name}.") for k in expected)
                      and not any(k.startswith(f"{name}.") for k in state_dict))
        expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] not in fresh}

    diff = diff_state_dicts(state_dict, expected)
    skipped = ""
    if not diff.ok:
        message = f"{path} does not match {type(target).__name__} ({layout} layout):\n{diff.describe()}"
        if strict:
            raise CheckpointMismatchError(message + "\n(strict=True: nothing was loaded)")
        logger.warning("%s\nstrict=False: loading the %d matching tensors only", message,
                       len(expected) - len(diff.missing) - len(diff.mismatched))
        skipped = diff.describe()
    mismatched = {key for key, _, _ in diff.mismatched}
    loadable = {k: v for k, v in state_dict.items() if k in expected and k not in mismatched}
    result = target.load_state_dict(loadable, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filtered above

    digest = file_sha256(path)
    logger.info("loaded %d tensors from %s (%s layout, sha256 %s)", len(loadable), path, layout, digest)
    for name in fresh:
        count = sum(p.numel() for p in getattr(target, name).parameters())
        logger.info("%s: initialised fresh (%s parameters): the file is a SAM-Med3D checkpoint, which has none",
                    name, f"{count:,}")
    return LoadReport(path=str(path), layout=layout, loaded_tensors=len(loadable), initialised_fresh=fresh,
                      skipped=skipped, sha256=digest)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks (the turbo file is ~400 MB): names the exact weights in logs."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()



# ------------------------------------------------------------------------------------------------------------------
# This project's checkpoints
# ------------------------------------------------------------------------------------------------------------------

TRAINED_KEYS = ("model_state_dict", "config")


def read_trained_checkpoint(path: str | Path, required: tuple[str, ...] = TRAINED_KEYS) -> dict[str, Any]:
    """The content of one of this project's checkpoints (best_model.pth, latest_model.pth, checkpoint_epoch_*.pth),
    read safely (``read_checkpoint``: weights_only, CPU). CheckpointError naming the file when it is unreadable,
    unsafe, or lacks any of ``required`` (the trainer's resume also requires the optimizer state and epoch)."""
    state = read_checkpoint(path)
    missing = [key for key in required if key not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (missing {', '.join(missing)}; use "
                              "best_model.pth or latest_model.pth)")
    return state


def load_trained_weights(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's ``model_state_dict`` into ``model`` strictly; CheckpointMismatchError naming the file
    and listing missing, unexpected and mis-shaped keys otherwise (nothing is loaded then)."""
    target = unwrap_model(model)
    weights = as_state_dict(state["model_state_dict"], Path(path), "model_state_dict")
    diff = diff_state_dicts(weights, target.state_dict())
    if not diff.ok:
        name = state.get("config", {}).get("model", {}).get("name")
        raise CheckpointMismatchError(f"{path}: weights do not fit the '{name}' architecture named in its "
                                      f"config:\n{diff.describe()}")
    target.load_state_dict(weights, strict=True)


def model_from_trained(state: dict[str, Any], path: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[SamMed3D, Config]:
    """(model in eval mode on ``device``, its Config) from a checkpoint's content (``read_trained_checkpoint``).
    The model is rebuilt from the saved config without pretrained weights (the checkpoint holds them all)."""
    config = Config.from_dict(state["config"])
    model = build_model(dataclasses.replace(config.model, pretrained_checkpoint=None,
                                            use_gradient_checkpointing=False))
    load_trained_weights(model, state, path)
    return model.to(device).eval(), config


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[SamMed3D, Config]:
    """(model in eval mode, its Config) from one of this project's checkpoints; CheckpointError naming the file
    for anything that is not one or does not fit its own architecture."""
    return model_from_trained(read_trained_checkpoint(path), path, device)
