"""Small layers shared by the encoder, the prompt encoder and the decoder."""
from __future__ import annotations

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
