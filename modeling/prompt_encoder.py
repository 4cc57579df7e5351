"""Prompt encoder of SAM-Med3D: clicks -> sparse tokens, a low-res mask (or its absence) -> a dense embedding.

Positional encoding is SAM's random-Fourier one: a fixed Gaussian matrix G (3×F, a persistent buffer in the
checkpoint) maps coordinates in [0, 1]³ to 2π·(2x − 1)·G and the features are [sin, cos, sin] (3·F = embed_dim).

Axis convention, as in the reference implementation and therefore in the published weights: a click's coordinate
vector (D, H, W voxel indices) is encoded in that order, but the dense grid encoding of token (i0, i1, i2) uses
the vector (i1, i0, i2) — the reference kept SAM 2-D's (x, y) stacking for its first two axes. The decoder of the
published checkpoint was trained with exactly this pairing, so it is reproduced (``dense_positional_encoding``)
and pinned by a test; changing it would silently change what the pretrained decoder does with clicks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from modeling.common import LayerNorm3d


class RandomFourierPositionEncoding3D(nn.Module):
    """Random-Fourier positional encoding of 3-D coordinates: …×3 in [0, 1] -> …×(3·num_pos_feats)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # Persistent: part of the published state dict (``pe_layer.positional_encoding_gaussian_matrix``).
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: …×3, normalised to [0, 1] -> …×(3·F) float32 features."""
        # Arguments reach tens of radians; half precision would round them to whole multiples of π/8 or worse.
        with torch.autocast(device_type=coords.device.type, enabled=False):
            projected = (2.0 * coords.float() - 1.0) @ self.positional_encoding_gaussian_matrix.float()
            projected = 2.0 * math.pi * projected
            return torch.cat([projected.sin(), projected.cos(), projected.sin()], dim=-1)

    def dense_positional_encoding(self, grid: int) -> torch.Tensor:
        """Encoding of every token centre of a g×g×g grid: 1×C×g×g×g (first two axes swapped, see module doc)."""
        device = self.positional_encoding_gaussian_matrix.device
        centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
        a0, a1, a2 = torch.meshgrid(centres, centres, centres, indexing="ij")
        features = self.encode(torch.stack([a1, a0, a2], dim=-1))     # g×g×g×C
        return features.permute(3, 0, 1, 2).unsqueeze(0)


class PromptEncoder3D(nn.Module):
    """Embeds clicks and an optional low-res mask prompt for the mask decoder.

    Parameter names follow the published checkpoint: ``pe_layer``, ``point_embeddings.{0: negative, 1: positive}``,
    ``not_a_point_embed``, ``mask_downscaling`` (two stride-2 convs with LayerNorm3d + GELU, then a 1×1×1 conv to
    embed_dim) and ``no_mask_embed``.
    """

    def __init__(self, embed_dim: int, image_embedding_size: int, input_image_size: int, mask_in_chans: int) -> None:
        super().__init__()
        if embed_dim % 3:
            raise ValueError(f"prompt embed_dim must be divisible by 3 (sin/cos/sin features), got {embed_dim}")
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        # The decoder upscales the token grid 4×, so mask prompts (its own earlier outputs) have this side.
        self.mask_input_size = 4 * image_embedding_size
        self.pe_layer = RandomFourierPositionEncoding3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim), nn.Embedding(1, embed_dim)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image tokens: 1×C×g×g×g."""
        return self.pe_layer.dense_positional_encoding(self.image_embedding_size)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """points B×P×3 voxel coords (D, H, W), labels B×P in {-1, 0, 1} -> tokens B×(P+1)×C.

        As in SAM (no box prompt), one padding point is appended. Padding points (label -1) carry only the
        not-a-point embedding; others carry their positional encoding plus the positive or negative embedding.
        """
        b = points.shape[0]
        points = torch.cat([points, points.new_zeros(b, 1, 3)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        is_pad = (labels == -1).unsqueeze(-1)
        # Padding coordinates are arbitrary (may be NaN or out of range); zero them before encoding.
        coords = (points.float().masked_fill(is_pad, 0.0) + 0.5) / self.input_image_size  # voxel centre -> [0, 1]
        positional = self.pe_layer.encode(coords).masked_fill(is_pad, 0.0)
        kinds = torch.cat([self.not_a_point_embed.weight, self.point_embeddings[0].weight,
                           self.point_embeddings[1].weight], dim=0)                        # 3×C: pad, neg, pos
        return positional + kinds[(labels + 1).long()]

    def forward(self, points: torch.Tensor | None, labels: torch.Tensor | None, mask_prompt: torch.Tensor | None,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse tokens B×T×C (T = P + 1, or 0 without points) and a dense embedding B×C×g×g×g.

        Without points there are no sparse tokens; without a mask prompt the dense embedding is ``no_mask_embed``
        at every position — together SAM's prompt-free ("automatic") mode.
        """
        if points is None or labels is None:
            sparse = self.no_mask_embed.weight.new_zeros(batch_size, 0, self.embed_dim)
        else:
            sparse = self.embed_points(points, labels)
        g = self.image_embedding_size
        if mask_prompt is None:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1, g, g, g)
        else:
            dense = self.mask_downscaling(mask_prompt)
        return sparse, dense
