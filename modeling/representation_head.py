"""Representation head for the BLIP-2 path: encoder tokens -> visual tokens and an ICH-presence logit.

Input is the encoder's feature map flattened to tokens, B×N×C with N = g³ spatial tokens in row-major (D, H, W)
order (N = 512 for both builds) and C = the encoder's output channels. Output:
``tokens`` B×N×visual_tokens (one per spatial position; a BLIP-2 Q-Former cross-attends to them) and ``ich_logit``
B (hemorrhage anywhere in the crop). The logit pools the tokens with learned attention weights rather than a mean,
because a small bleed occupies a handful of the 512 positions and a mean would dilute it.

"Dynamic initialisation": ``RepresentationHead.for_encoder`` sizes the head from the encoder's actual output width,
so any encoder variant gets a matching head without hand edits.
"""
from __future__ import annotations

import torch
from torch import nn


class RepresentationHead(nn.Module):
    """LayerNorm + linear projection to ``visual_tokens`` per token; attention pooling -> one ICH logit."""

    def __init__(self, in_features: int, visual_tokens: int) -> None:
        super().__init__()
        if in_features < 1 or visual_tokens < 1:
            raise ValueError(f"RepresentationHead needs positive widths, got in_features={in_features}, "
                             f"visual_tokens={visual_tokens}")
        self.in_features = in_features
        self.visual_tokens = visual_tokens
        self.norm = nn.LayerNorm(in_features)
        self.proj = nn.Linear(in_features, visual_tokens)
        self.pool_score = nn.Linear(visual_tokens, 1)
        self.classifier = nn.Linear(visual_tokens, 1)

    @classmethod
    def for_encoder(cls, encoder: nn.Module, visual_tokens: int) -> RepresentationHead:
        """A head whose input width is the encoder's ``num_features`` (its real output channels)."""
        return cls(int(encoder.num_features), visual_tokens)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens: B×N×C -> {"tokens": B×N×visual_tokens, "ich_logit": B}."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_features:
            raise ValueError(f"representation head: expected B×N×{self.in_features} encoder tokens, got shape "
                             f"{'×'.join(str(s) for s in tokens.shape)}")
        visual = self.proj(self.norm(tokens))
        weights = torch.softmax(self.pool_score(visual).float(), dim=1)          # B×N×1, fp32 for the softmax
        pooled = (weights * visual.float()).sum(dim=1)                            # B×V
        ich_logit = self.classifier(pooled.to(visual.dtype)).squeeze(-1)
        return {"tokens": visual, "ich_logit": ich_logit}
