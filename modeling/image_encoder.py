"""The 3-D ViT image encoder of SAM-Med3D: patch embedding, transformer blocks with windowed or global
attention and a decomposed relative-position bias, and a convolutional neck.

Shapes for the published model (``sam_med3d_turbo``): input B×1×128×128×128 -> patches of 16³ -> an 8×8×8 grid
of 768-wide tokens -> 12 blocks -> neck -> features B×384×8×8×8.

Two facts of the reference implementation that the published weights depend on, reproduced exactly here:

1. **Window blocks pad.** A block with window size w > g (g = token grid side, 14 > 8 for the real model) pads
   the g³ grid, after ``norm1``, with zeros to w³ positions, attends over all of them with no padding mask and
   crops the g³ real positions back. A zero token projects to the qkv bias, so all padded keys share one key
   vector and one value vector, and only the g³ real queries are kept. We therefore never materialise the
   w³ grid: the padded keys are folded into one extra key whose attention logit carries
   log Σ_padded exp(bias) — the same softmax, in closed form (see ``_padded_key_log_mass``).

2. **The relative-position bias is the reference's broadcasting, not the textbook formula.** For a window of
   side n, a query at (i, j, l) and a key at (a, e, k) get

       bias = q(i,j,l)·R_d[i − k] + q(i,j,a)·R_h[j − k] + q(i,j,e)·R_w[e − k],      R_x[δ] = rel_pos_x[δ + n − 1],

   where q(i,j,a) is the query vector at grid position (i, j, a). (The reference adds its per-axis einsum
   outputs with singleton axes inserted one place off, so every term lands on the key's last axis; the shapes
   are all n, so nothing complains.) The textbook form would be q(i,j,l)·(R_d[i−a] + R_h[j−e] + R_w[l−k]).
   The published ``rel_pos_*`` tables were trained with the former, so that is what we compute.

Attention itself goes through ``F.scaled_dot_product_attention`` with the bias as an additive float mask, so GPUs
use a fused kernel; the bias is computed in fp32 with autocast off (it is a log of a sum of exponentials).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.common import LayerNorm3d, MLPBlock
from modeling.validation import check_volume

# SAM convention for the encoder's transformer LayerNorms.
ENCODER_NORM_EPS = 1e-6


def relative_embeddings(table: torch.Tensor, query_len: int, key_len: int) -> torch.Tensor:
    """Rows of a relative-position table for every (query index, key index) pair.

    table: (2·key_len − 1)×c, row r holding offset r − (key_len − 1).
    Returns query_len×key_len×c with [q, k] = table[q − k + key_len − 1] (query_len <= key_len).
    """
    q = torch.arange(query_len, device=table.device)[:, None]
    k = torch.arange(key_len, device=table.device)[None, :]
    return table[q - k + key_len - 1]


def relative_position_terms(q: torch.Tensor, q_row: torch.Tensor, rel_pos_d: torch.Tensor,
                            rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three per-axis terms of the reference bias (module docstring, fact 2).

    q: B×h×g×g×g×c real queries; q_row: B×h×g×g×n×c the queries along the last axis of each (i, j) row of the
    n-wide window (real for index < g, the padding query beyond). Returns
    t_d B×h×g×g×g×n ([i,j,l,k] = q(i,j,l)·R_d[i−k]), t_h B×h×g×g×n×n ([i,j,a,k] = q(i,j,a)·R_h[j−k]) and
    t_w B×h×g×g×n×n ([i,j,e,k] = q(i,j,e)·R_w[e−k]); the bias of query (i,j,l) and key (a,e,k) is
    t_d[i,j,l,k] + t_h[i,j,a,k] + t_w[i,j,e,k].
    """
    g, n = q.shape[2], q_row.shape[4]
    t_d = torch.einsum("bhijlc,ikc->bhijlk", q, relative_embeddings(rel_pos_d, g, n))
    t_h = torch.einsum("bhijac,jkc->bhijak", q_row, relative_embeddings(rel_pos_h, g, n))
    t_w = torch.einsum("bhijec,ekc->bhijek", q_row, relative_embeddings(rel_pos_w, n, n))
    return t_d, t_h, t_w


def _real_key_bias(t_d: torch.Tensor, t_h: torch.Tensor, t_w: torch.Tensor, g: int) -> torch.Tensor:
    """Bias between the g³ real queries and the g³ real keys: B×h×g³×g³ (row-major (D, H, W) order both ways)."""
    b, h = t_d.shape[:2]
    td = t_d[..., :g]                       # B h i j l k
    th = t_h[..., :g, :g]                   # B h i j a k
    tw = t_w[..., :g, :g]                   # B h i j e k
    # The h and w terms do not depend on l: add them first on the 8× smaller tensor.
    bias = td[:, :, :, :, :, None, None, :] + (th[:, :, :, :, None, :, None, :]
                                              + tw[:, :, :, :, None, None, :, :])  # B h i j l a e k
    return bias.reshape(b, h, g ** 3, g ** 3)


def _padded_key_log_mass(t_d: torch.Tensor, t_h: torch.Tensor, t_w: torch.Tensor, g: int) -> torch.Tensor:
    """log Σ over the n³ − g³ padded keys of exp(bias), per real query: B×h×g³×1.

    The bias of key (a, e, k) is t_d[k] + t_h[a, k] + t_w[e, k], so for a fixed last-axis index k the sum over
    (a, e) factorises. Key (a, e, k) is padding when any index is >= g:
      k >= g: every (a, e) is padding -> H_all(k)·W_all(k);
      k <  g: a >= g, or a < g and e >= g -> H_pad·W_all + H_real·W_pad (two positive terms, no cancellation).
    All sums are taken in log space.
    """
    b, h = t_d.shape[:2]
    lse = torch.logsumexp
    h_all, w_all = lse(t_h, dim=4), lse(t_w, dim=4)            # B h i j k
    h_real, h_pad = lse(t_h[:, :, :, :, :g], dim=4), lse(t_h[:, :, :, :, g:], dim=4)
    w_pad = lse(t_w[:, :, :, :, g:], dim=4)
    inner = torch.logaddexp(h_pad + w_all, h_real + w_pad)[..., :g]
    outer = (h_all + w_all)[..., g:]
    log_pairs = torch.cat([inner, outer], dim=-1)               # B h i j k
    mass = lse(t_d + log_pairs[:, :, :, :, None, :], dim=-1)    # B h i j l
    return mass.reshape(b, h, g ** 3, 1)


class RelPosAttention3D(nn.Module):
    """Multi-head self-attention over a cubic token grid with SAM-Med3D's relative-position bias.

    Parameters (names as in the published checkpoint): ``qkv`` (dim -> 3·dim, with bias), ``proj``, and
    ``rel_pos_d/h/w`` of shape (2·n − 1)×head_dim where n is the window side (or the grid side for global blocks).
    """

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rel_pos_size = rel_pos_size
        # The qkv bias is required: it is what the zero padding tokens of a window block project to.
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # Zero init as in the reference (these tables are normally loaded from the checkpoint).
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×g×g×g×dim (already normalised) -> B×g×g×g×dim.

        When ``rel_pos_size`` n > g, x is treated as the real corner of an n³ window whose other positions are
        zero tokens (module docstring, fact 1); when n == g it is plain attention over the grid.
        """
        b, g = x.shape[0], x.shape[1]
        n = self.rel_pos_size
        if g > n:
            raise RuntimeError(f"RelPosAttention3D got a {g}³ grid but its tables cover windows of {n}³")
        tokens = g ** 3
        qkv = self.qkv(x).reshape(b, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                 # B×h×g³×c each
        # A zero (padding) token projects to the bias: its query, key and value are the bias slices.
        fill = self.qkv.bias.view(3, self.num_heads, 1, self.head_dim) if n > g else None
        bias = self._attention_bias(q, None if fill is None else fill[0], g, n)
        if fill is not None:
            # All padded keys share one key and one value; the extra column of ``bias`` carries their total mass.
            k = torch.cat([k, fill[1].to(k.dtype).expand(b, -1, -1, -1)], dim=2)
            v = torch.cat([v, fill[2].to(v.dtype).expand(b, -1, -1, -1)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.transpose(1, 2).reshape(b, g, g, g, self.num_heads * self.head_dim)
        return self.proj(out)

    def _attention_bias(self, q: torch.Tensor, q_fill: torch.Tensor | None, g: int, n: int) -> torch.Tensor:
        """Additive attention bias B×h×g³×K (K = g³, or g³ + 1 with the padded-key column), computed in fp32."""
        b, h, _, c = q.shape
        # The bias is a log of sums of exponentials; in bf16/fp16 it would lose the precision the softmax needs.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q32 = q.float().reshape(b, h, g, g, g, c)
            if q_fill is not None:
                fill = q_fill.float().reshape(1, h, 1, 1, 1, c).expand(b, h, g, g, n - g, c)
                q_row = torch.cat([q32, fill], dim=4)
            else:
                q_row = q32
            t_d, t_h, t_w = relative_position_terms(q32, q_row, self.rel_pos_d.float(), self.rel_pos_h.float(),
                                                    self.rel_pos_w.float())
            bias = _real_key_bias(t_d, t_h, t_w, g)
            if q_fill is not None:
                bias = torch.cat([bias, _padded_key_log_mass(t_d, t_h, t_w, g)], dim=-1)
        return bias


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``norm1`` -> (windowed or global) attention -> residual -> ``norm2`` -> MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=ENCODER_NORM_EPS)
        self.attn = RelPosAttention3D(dim, num_heads, rel_pos_size=window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=ENCODER_NORM_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×g×g×g×dim -> B×g×g×g×dim."""
        g = x.shape[1]
        y = self.norm1(x)
        if 0 < self.window_size < g:
            y = self._attend_in_windows(y)
        else:
            # Global block, or one window that covers the whole (zero-padded) grid.
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))

    def _attend_in_windows(self, x: torch.Tensor) -> torch.Tensor:
        """Several windows (window < grid): pad with zero tokens, attend per window, crop. B×g³×C -> B×g³×C."""
        b, g, c = x.shape[0], x.shape[1], x.shape[-1]
        w = self.window_size
        pad = (w - g % w) % w
        x = F.pad(x, (0, 0, 0, pad, 0, pad, 0, pad))
        m = (g + pad) // w
        windows = x.reshape(b, m, w, m, w, m, w, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, w, w, w, c)
        out = self.attn(windows)  # each window is full-size here: the padding tokens are materialised
        out = out.reshape(b, m, m, m, w, w, w, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, m * w, m * w, m * w, c)
        return out[:, :g, :g, :g]


class ImageEncoderViT3D(nn.Module):
    """3-D ViT encoder: B×in_chans×S×S×S volumes -> B×out_chans×g×g×g features (g = S / patch_size).

    The constructor's keyword arguments are exactly ``self.config``, so ``ImageEncoderViT3D(**encoder.config)``
    rebuilds an identical architecture (the BLIP-2 export relies on it). ``gradient_checkpointing`` recomputes each
    block in backward instead of storing its activations.
    """

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int = 1, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, out_chans: int, window_size: int,
                 global_attn_indexes: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {list(global_attn_indexes)} must lie in [0, {depth}); got {bad}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: global attention everywhere), got {window_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self._config: dict[str, Any] = {
            "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans, "embed_dim": embed_dim,
            "depth": depth, "num_heads": num_heads, "mlp_ratio": float(mlp_ratio), "out_chans": out_chans,
            "window_size": window_size, "global_attn_indexes": [int(i) for i in global_attn_indexes],
        }
        self.gradient_checkpointing = False

        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size, self.grid_size, self.grid_size, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads, mlp_ratio,
                         window_size=0 if i in global_attn_indexes else window_size, grid_size=self.grid_size)
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    @property
    def config(self) -> dict[str, Any]:
        """Plain-data constructor arguments (lists, not tuples, so the dict survives JSON as well as torch.save)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @property
    def num_features(self) -> int:
        """Channels C of the output features, read from the neck itself (not from a remembered argument)."""
        return int(self.neck[-1].weight.shape[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: B×in_chans×S×S×S (validated) -> features B×C×g×g×g."""
        check_volume(images, self.img_size, self.in_chans, self.pos_embed.dtype)
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches -> tokens: B×in×S×S×S -> B×g×g×g×embed_dim (channels last)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)
