"""Tests for memory.py: the training-memory estimate read from the built model, the epoch memory monitor and the
RSS sampler."""
from __future__ import annotations

import sys
import time

import psutil
import pytest
import torch
from torch import nn

import memory
from model import build_sam_med3d_turbo, build_tiny
from utils import GB


def _on_meta(builder, *, checkpointing: bool = False, frozen: bool = False) -> nn.Module:
    """A model built on the meta device: real parameter counts and geometry, no memory."""
    with torch.device("meta"):
        model = builder()
    model.set_gradient_checkpointing(checkpointing)
    model.set_encoder_frozen(frozen)
    return model


@pytest.fixture(scope="module")
def turbo():
    return _on_meta(build_sam_med3d_turbo)


# --------------------------------------------------------------------------------------------------- memory estimate

def test_estimate_training_memory_matches_worked_example(turbo):
    # Hand computation in the docstring: 1.25 * (1.50 + 2 * 1.47) GB, from the built model's 100.6 M parameters.
    estimate = memory.estimate_training_memory_gb(turbo, 2, False)
    assert estimate == pytest.approx(5.54, abs=0.05)


def test_estimate_training_memory_reads_the_options_from_the_model(turbo):
    def est(model=turbo, batch_size=2, mixed_precision=False, **kw):
        return memory.estimate_training_memory_gb(model, batch_size, mixed_precision, **kw)

    base = est()
    checkpointed = _on_meta(build_sam_med3d_turbo, checkpointing=True)
    frozen = _on_meta(build_sam_med3d_turbo, frozen=True)
    assert est(mixed_precision=True) < base
    assert est(checkpointed) < base
    assert est(frozen) < est(checkpointed)
    assert est(click_rounds=3) > base
    # Activations grow linearly with the batch; the weight state does not.
    assert est(batch_size=3) - est(batch_size=2) == pytest.approx(est(batch_size=2) - est(batch_size=1))
    assert est(batch_size=2) < 2 * est(batch_size=1)
    assert est(_on_meta(build_tiny), batch_size=1) < 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(model=nn.Linear(2, 2)), "expected a built SamMed3D"),
    (dict(batch_size=0), "batch_size"),
    (dict(click_rounds=0), "click_rounds"),
])
def test_estimate_training_memory_rejects_bad_input(turbo, kwargs, message):
    args = dict(model=turbo, batch_size=1, mixed_precision=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        memory.estimate_training_memory_gb(**args)


# --------------------------------------------------------------------------------------------------- memory monitor

def test_memory_monitor_tracks_sampled_peak_on_cpu(monkeypatch):
    # Real allocations are unreliable here (a long test process reuses freed, still-resident pages), so the
    # process's RSS readings are scripted: 1.0 GB at reset, 1.5 GB at a sample mid-epoch, 1.2 GB at the end.
    monitor = memory.MemoryMonitor(torch.device("cpu"))
    readings = iter([1.0, 1.5, 1.2, 1.2, 0.9, 0.9, 0.9])

    class Info:
        def __init__(self, gb):
            self.rss = int(gb * GB)

    monkeypatch.setattr(monitor._process, "memory_info", lambda: Info(next(readings)))
    monitor.reset()                    # 1.0
    monitor.sample()                   # 1.5: the peak, gone by the time the epoch ends
    after = monitor.snapshot()         # samples 1.2, reports current 1.2
    assert after["peak_rss_gb"] == pytest.approx(1.5) and after["rss_gb"] == pytest.approx(1.2)
    assert after["peak_gpu_allocated_gb"] is None and after["peak_gpu_reserved_gb"] is None
    monitor.reset()                    # a new epoch forgets the old peak
    assert monitor.snapshot()["peak_rss_gb"] == pytest.approx(0.9)


def test_memory_monitor_reads_real_process_memory():
    snapshot = memory.MemoryMonitor(torch.device("cpu")).snapshot()
    assert 0 < snapshot["rss_gb"] <= snapshot["peak_rss_gb"]
    if sys.platform.startswith("linux"):
        assert snapshot["ru_maxrss_gb"] >= snapshot["rss_gb"] - 0.01


def test_memory_monitor_reads_cuda_peaks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * GB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * GB)
    monitor = memory.MemoryMonitor(torch.device("cuda", 0))
    monitor.reset()
    snap = monitor.snapshot()
    assert calls == [torch.device("cuda", 0)]
    assert snap["peak_gpu_allocated_gb"] == 3.0 and snap["peak_gpu_reserved_gb"] == 4.0




def test_rss_sampler_records_the_peak_of_the_block():
    # The peak is compared with the RSS seen while the block is held, not with "before + 64 MiB": the allocator
    # may serve the block from memory the process already holds (seen once under pytest-xdist: +31 MiB only).
    with memory.RssSampler(interval_s=0.001, children=True) as sampler:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched, held while the sampler thread runs, then freed
        held = psutil.Process().memory_info().rss
        time.sleep(0.05)
        del block
    after = psutil.Process().memory_info().rss
    assert sampler.peak >= held - 4 * 2**20
    assert sampler.peak >= after
