"""Mask decoder of SAM-Med3D: a two-way transformer between prompt tokens and image tokens, then hypernetwork
masks on a 4×-upscaled token grid and an IoU (mask-quality) head.

Shapes (published model): image features B×384×8×8×8, tokens B×(1 IoU + 4 mask + T prompt)×384
-> masks B×4×32×32×32 (index 0: the single-mask output, 1..3: the multimask outputs) and IoU predictions B×4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeling.common import MLP, LayerNorm3d, MLPBlock


class TokenAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally to a narrower internal width.

    q: B×Nq×C, k and v: B×Nk×C -> B×Nq×C. ``downsample_rate`` 2 halves the internal width (cross attention).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention internal width {internal} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock3D(nn.Module):
    """Tokens self-attend, attend to the image, pass an MLP; then the image attends back to the tokens.

    ``skip_first_layer_pe``: the first block's self-attention sees the raw tokens (no positional term) and replaces
    them instead of adding a residual, as in SAM.
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int,
                 skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = TokenAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries B×T×C (prompt tokens), keys B×N×C (image tokens); *_pe are added to q/k, never to v."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """``depth`` two-way blocks plus a final token-to-image attention and LayerNorm."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                                   skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding B×C×g×g×g, image_pe 1×C×g×g×g (or B×…), point_embedding B×T×C
        -> (tokens B×T×C, image tokens B×g³×C)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder3D(nn.Module):
    """Predicts 1 + ``num_multimask_outputs`` masks and their IoU from image features and prompt embeddings."""

    def __init__(self, transformer_dim: int, depth: int, num_heads: int, mlp_dim: int, num_multimask_outputs: int,
                 iou_head_depth: int, iou_head_hidden_dim: int, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        if transformer_dim % 8:
            raise ValueError(f"transformer_dim must be divisible by 8 (mask upscaling), got {transformer_dim}")
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer3D(depth, transformer_dim, num_heads, mlp_dim, attention_downsample_rate)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings B×C×g×g×g, image_pe 1×C×g×g×g, sparse B×T×C, dense B×C×g×g×g
        -> (mask logits B×K×4g×4g×4g, IoU predictions B×K), K = 1 + num_multimask_outputs (all of them)."""
        b = image_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings.to(
            output_tokens.dtype)], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        hs, image_tokens = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]

        c, g = src.shape[1], src.shape[2]
        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(b, c, g, g, g))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)                                              # B×K×C/8
        _, cu, gx, gy, gz = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, cu, gx * gy * gz)).reshape(b, -1, gx, gy, gz)
        return masks, self.iou_prediction_head(iou_token_out)
