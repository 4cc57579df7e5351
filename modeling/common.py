"""Small layers shared by the encoder, the prompt encoder and the decoder, and the masks' trilinear upsampling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a channels-first B×C×D×H×W tensor (as conv stacks produce).

    Parameters are ``weight`` and ``bias`` of shape C, matching the published checkpoint.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×C×D×H×W -> B×C×D×H×W, normalised over C with the biased variance, as the reference does."""
        # F.layer_norm on a channels-last view is the same formula as a hand-written mean/var, but autocast
        # runs it in fp32, which keeps the variance accurate when the convolutions produced bf16/fp16.
        y = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 4, 1, 2, 3)


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between (``lin1`` -> act -> ``lin2``), on B×…×C tensors."""

    def __init__(self, embedding_dim: int, mlp_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers (``layers.0`` … ``layers.{n-1}``) with ReLU between them, none after the last."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def upsample_trilinear(volume: torch.Tensor, size: int) -> torch.Tensor:
    """``F.interpolate(volume, size=(size,) * 3, mode="trilinear", align_corners=False)`` for B×C×n×n×n logits.

    On a CPU, when ``size`` is a whole multiple of n, the same values are computed axis by axis from shifted
    slices: with PyTorch's trilinear kernel, forward + backward took 5.9 ms for the tiny build's 32³ -> 64³ masks
    (batch 2, 2 cores) and 48 ms for turbo's 32³ -> 128³, against 2.0 and 9.7 ms this way (bench/op_bench.py), and
    every training decode pays it.
    Elsewhere (GPUs, not measured there) and for other sizes, ``F.interpolate`` itself.
    """
    n = volume.shape[-1]
    if volume.device.type != "cpu" or size % n or volume.shape[-3:] != (n, n, n):
        return F.interpolate(volume, size=(size,) * 3, mode="trilinear", align_corners=False)
    factor = size // n
    for dim in (2, 3, 4):
        volume = _upsample_axis(volume, dim, factor)
    return volume


def _upsample_axis(volume: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    """Linear upsampling by an integer ``factor`` along ``dim`` with align_corners=False: output j reads input
    position (j + 0.5) / factor - 0.5, clamped to the volume (so the edge voxels repeat)."""
    n = volume.shape[dim]
    padded = torch.cat([volume.narrow(dim, 0, 1), volume, volume.narrow(dim, n - 1, 1)], dim=dim)
    phases = []
    for phase in range(factor):
        position = (phase + 0.5) / factor - 0.5          # in (-0.5, 0.5): between voxel i-1 and i, or i and i+1
        below = math.floor(position)
        weight = position - below
        lower = padded.narrow(dim, 1 + below, n)
        phases.append(torch.lerp(lower, padded.narrow(dim, 2 + below, n), weight) if weight else lower)
    shape = list(volume.shape)
    shape[dim] = n * factor
    return torch.stack(phases, dim=dim + 1).reshape(shape)
