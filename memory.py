"""Memory: the training-memory estimate (read from the built model), the per-epoch memory monitor and the one RSS
sampler the benches share.

Sizes are reported in GB meaning 2**30 bytes (what ``nvidia-smi`` and ``free -g`` call GiB).
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import psutil
import torch
from torch import nn

from utils import GB

try:
    import resource  # POSIX only: the lifetime peak RSS
except ImportError:
    resource = None

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Training-memory estimate
# ---------------------------------------------------------------------------------------------------------------

# Bytes per trainable parameter: fp32 weight (4) + fp32 gradient (4) + AdamW exp_avg and exp_avg_sq (4 + 4).
_BYTES_PER_TRAINABLE_PARAM = 16
# Bytes per frozen parameter: the fp32 weight only.
_BYTES_PER_FROZEN_PARAM = 4
# Under autocast the 16-bit copies of the weights used in the forward are cached for the step.
_AUTOCAST_WEIGHT_COPY_BYTES = 2
# Activation elements a pre-norm ViT block keeps for backward, per token and per unit of width:
# norm1 input 1 + qkv input 1 + q,k,v 3 + attention output 1 + norm2 input 1 + fc1 input 1 + GELU input 4
# + fc2 input 4 = 16. This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models"): 34*s*h bytes at 2 bytes per element, less the two dropout masks our blocks do not have.
_BLOCK_ELEMENTS_PER_TOKEN_WIDTH = 16
# Attention-score elements kept per (head, query, key): the softmax output and the score tensor that the
# decomposed relative-position bias is added to (an upper bound when fused SDPA kernels avoid materialising it).
_SCORE_ELEMENTS_PER_ENTRY = 2
# Elements per input voxel outside the encoder, for one prompt round: the 128^3 mask logits, their sigmoid and
# the Dice/BCE intermediates (about 7 voxel-sized tensors), plus the decoder's transposed-conv upscaling
# (96 channels at (S/8)^3 and 48 at (S/4)^3 with LayerNorm+GELU, about 2 per input voxel) and the label: ~10.
_HEAD_ELEMENTS_PER_VOXEL_PER_ROUND = 10
# Caching-allocator fragmentation, cuBLAS/cuDNN workspaces and backward temporaries: +25 %.
_ALLOCATOR_OVERHEAD = 1.25


def estimate_training_memory_gb(model: nn.Module, batch_size: int, mixed_precision: bool, *,
                                click_rounds: int = 1) -> float:
    """A rough estimate of peak GPU memory (GB) for one training step of the built ``model`` (a SamMed3D, after
    ``build_model`` applied freezing and gradient checkpointing); for warnings, not for planning to the MB.

    Everything architectural is read from the model: parameter counts (trainable = requires_grad), the encoder's
    geometry (``model.encoder_config``: img_size, patch_size, embed_dim, depth, num_heads, window_size,
    global_attn_indexes) and whether it recomputes blocks (``image_encoder.gradient_checkpointing``).

    peak = overhead * (weight state + batch_size * activations per sample), where

    - weight state: 16 bytes per trainable parameter (weight, gradient, two AdamW moments), 4 per frozen one,
      plus 2 per parameter under autocast (16-bit weight copies);
    - encoder activations per sample: each block keeps 16 * tokens * width elements plus 2 elements per
      attention score (heads * tokens * keys, keys = all tokens in global blocks and window_size**3 in window
      blocks, where only the real tokens are queried). Gradient checkpointing keeps only each block's input
      (tokens * width) plus one block being recomputed; a frozen encoder keeps nothing for backward;
    - decoder and loss: 10 elements per input voxel per prompt round, plus the input itself;
    - 4 bytes per activation element in fp32, 2 under mixed precision.

    Worked example, sam_med3d_turbo at 128^3 in fp32: 512 tokens; a global block keeps 6.3 M + 6.3 M elements,
    a window block 6.3 M + 33.7 M (keys = 14^3 = 2744); 4 global + 8 window blocks = 370 M elements = 1.38 GB per
    sample, plus 0.09 GB for decoder and loss; the weight state (100.6 M parameters) is 1.50 GB; batch 2 with the
    25 % allocator overhead comes to 1.25 * (1.50 + 2 * 1.47) = 5.5 GB.
    """
    encoder = getattr(model, "image_encoder", None)
    geometry = getattr(model, "encoder_config", None)
    if encoder is None or not isinstance(geometry, dict):
        raise ValueError(f"expected a built SamMed3D (with image_encoder and encoder_config), got "
                         f"{type(model).__name__}")
    for label, value in (("batch_size", batch_size), ("click_rounds", click_rounds)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    total_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = trainable * _BYTES_PER_TRAINABLE_PARAM + (total_params - trainable) * _BYTES_PER_FROZEN_PARAM
    if mixed_precision:
        weight_bytes += total_params * _AUTOCAST_WEIGHT_COPY_BYTES

    img_size, width, depth = geometry["img_size"], geometry["embed_dim"], geometry["depth"]
    tokens = (img_size // geometry["patch_size"]) ** 3
    token_elements = _BLOCK_ELEMENTS_PER_TOKEN_WIDTH * tokens * width

    def block_elements(keys: int) -> int:
        return token_elements + _SCORE_ELEMENTS_PER_ENTRY * geometry["num_heads"] * tokens * keys

    # A window block pads the token grid to whole windows and attends without a padding mask, so every real
    # query sees window_size**3 keys even when the grid (8^3 at 128^3) is smaller than one window.
    window_keys = geometry["window_size"] ** 3 if geometry["window_size"] > 0 else tokens
    global_blocks = len(geometry["global_attn_indexes"])
    blocks = [block_elements(tokens)] * global_blocks + [block_elements(window_keys)] * (depth - global_blocks)
    if not any(p.requires_grad for p in encoder.parameters()):
        encoder_elements = max(blocks)  # a frozen encoder runs forward-only: one block's temporaries at a time
    elif getattr(encoder, "gradient_checkpointing", False):
        encoder_elements = depth * tokens * width + max(blocks)
    else:
        encoder_elements = sum(blocks)
    voxels = img_size**3
    head_elements = voxels * (1 + _HEAD_ELEMENTS_PER_VOXEL_PER_ROUND * click_rounds)
    bytes_per_element = 2 if mixed_precision else 4
    activation_bytes = batch_size * (encoder_elements + head_elements) * bytes_per_element

    return _ALLOCATOR_OVERHEAD * (weight_bytes + activation_bytes) / GB


# ---------------------------------------------------------------------------------------------------------------
# Measuring memory
# ---------------------------------------------------------------------------------------------------------------

def children_rss(process: psutil.Process) -> int:
    """Summed RSS of all descendants of ``process`` (DataLoader workers, wandb's service); pages shared
    copy-on-write with the parent are counted in each process, so the sum overstates."""
    total = 0
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that exited between listing and reading has no memory to count
    return total


class RssSampler:
    """Peak RSS of this process (and its children with ``children``), sampled on a background thread every
    ``interval_s`` while the ``with`` block runs: ``peak`` in bytes."""

    def __init__(self, interval_s: float = 0.002, children: bool = False) -> None:
        self.interval_s, self.children = interval_s, children
        self.process = psutil.Process()
        self.peak = self._current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _current(self) -> int:
        return self.process.memory_info().rss + (children_rss(self.process) if self.children else 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._current())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._current())


def _ru_maxrss_bytes() -> int | None:
    """Lifetime peak RSS of this process from getrusage: KiB on Linux, bytes on macOS, absent on Windows."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMonitor:
    """Peak host and GPU memory over an epoch.

    Host RSS has no resettable peak counter, so the peak is the maximum over ``sample()`` calls (call it every
    few steps); ``ru_maxrss`` is reported too but is the peak over the whole process lifetime. DataLoader workers
    are separate processes: the RSS of all child processes (workers, and wandb's service when tracking) is
    summed as ``peak_children_rss_gb`` (pages shared copy-on-write with the parent are counted in both, so this
    overstates). On CUDA the allocator's own peak counters are used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self._peak_rss = 0
        self._peak_children_rss = 0

    def reset(self) -> None:
        """Start a new measuring period (call at epoch start)."""
        self._peak_rss = 0
        self._peak_children_rss = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()

    def sample(self) -> None:
        """Read the current RSS of this process and its children and update the peaks."""
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        self._peak_children_rss = max(self._peak_children_rss, children_rss(self._process))

    def snapshot(self) -> dict[str, Any]:
        """Peaks since ``reset()`` in GB (takes one more sample first)."""
        self.sample()
        maxrss = _ru_maxrss_bytes()
        result: dict[str, float | None] = {
            "rss_gb": self._process.memory_info().rss / GB,
            "peak_rss_gb": self._peak_rss / GB,
            "peak_children_rss_gb": self._peak_children_rss / GB,
            "ru_maxrss_gb": None if maxrss is None else maxrss / GB,
            "peak_gpu_allocated_gb": None,
            "peak_gpu_reserved_gb": None,
        }
        if self.device.type == "cuda":
            result["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
        return result
