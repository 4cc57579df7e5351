"""Using the fine-tuned encoder in a BLIP-2-style vision-language model.

``sam_encoder.pth`` (written by the trainer for the best model) holds the image encoder, the representation head
and the preprocessing they expect. This module turns a raw CT volume into the encoder's input with those saved
settings (``prepare_encoder_input``) and holds the two checks that prove the export works: the encoder rebuilt
from the file alone reproduces the trained model's tokens bit for bit, and its tokens drive a real BLIP-2
Q-Former with gradients flowing back into the encoder. ``python train.py --test`` and the tests run both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from data.preprocess import Preprocessing, pad_with_air, preprocess_image
from model import load_sam_encoder, load_trained
from modeling.checkpoint import read_checkpoint


def prepare_encoder_input(volume: np.ndarray, spacing: Sequence[float],
                          preprocessing: Preprocessing | Mapping[str, Any]) -> torch.Tensor:
    """Raw HU volume (D×H×W, voxel ``spacing`` in mm) → encoder input 1×1×S×S×S.

    Applies the training pipeline with the export's saved ``preprocessing`` (a Preprocessing, or the plain dict
    stored in ``sam_encoder.pth``: HU window, normalisation, target spacing, input size S), then centre-crops or
    pads with air to S³ (MONAI ``ResizeWithPadOrCrop`` through ``pad_with_air``, as in training). At 1.5 mm a 128³
    input spans 192 mm, which holds a whole adult head.
    """
    if isinstance(preprocessing, Mapping):
        preprocessing = Preprocessing.from_dict(preprocessing)
    prepared = torch.as_tensor(preprocess_image(volume, spacing, preprocessing), dtype=torch.float32)
    fitted = pad_with_air(prepared, preprocessing.input_size, center_crop=True)
    return fitted[None].contiguous()


def check_encoder_export(encoder_path: Path, best_path: Path) -> str:
    """The encoder rebuilt from sam_encoder.pth alone gives bit-identical tokens to the trained model's encoder.

    Returns a short description; raises AssertionError on a mismatch.
    """
    trained, _ = load_trained(best_path)
    export = read_checkpoint(encoder_path)
    encoder = load_sam_encoder(encoder_path)
    size = int(encoder.config["img_size"])
    volume = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.encode(volume).flatten(2).transpose(1, 2)
        tokens = encoder(volume)
    assert set(encoder.state_dict()) == set(export["image_encoder_state_dict"]), "encoder keys differ from export"
    assert torch.equal(tokens, expected), "tokens differ from the trained model's encoder"
    return f"tokens {tuple(tokens.shape)} bit-identical, num_features={encoder.num_features}"


def check_qformer(encoder_path: Path) -> str:
    """Feed the exported encoder's tokens into a tiny real BLIP-2 Q-Former; gradients must reach the encoder."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel  # optional: a test-only dependency

    encoder = load_sam_encoder(encoder_path)
    encoder.train()
    qformer_config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, encoder_hidden_size=encoder.num_features,
                                        cross_attention_frequency=1)
    qformer = Blip2QFormerModel(qformer_config)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 8, qformer_config.hidden_size, generator=generator)
    size = int(encoder.config["img_size"])
    volume = torch.randn(2, 1, size, size, size, generator=generator)
    tokens = encoder(volume)
    attention = torch.ones(tokens.shape[:2], dtype=torch.long)
    output = qformer(query_embeds=queries, encoder_hidden_states=tokens, encoder_attention_mask=attention)
    hidden = output.last_hidden_state
    assert hidden.shape == (2, 8, qformer_config.hidden_size), f"unexpected Q-Former output {tuple(hidden.shape)}"
    # A random projection as the loss: a plain sum of LayerNorm outputs has zero gradient by construction.
    (hidden * torch.randn(hidden.shape, generator=generator)).sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "some encoder parameters received no gradient"
    assert any(g.abs().sum() > 0 for g in grads), "encoder gradients are all zero"
    return f"Q-Former queries {tuple(hidden.shape)}, gradients reach all {len(grads)} encoder tensors"


