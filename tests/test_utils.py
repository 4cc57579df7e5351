"""Tests for utils.py: seeding/RNG state, atomic writes, system checks, timing, memory, summaries, retention,
metrics CSV, pictures and logging."""
from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

import utils

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _draws() -> tuple:
    """Next values of the three generators, including the cached-Gaussian paths."""
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            torch.rand(4).tolist())


# --------------------------------------------------------------------------------------------------- seeding / RNG

def test_seed_everything_reproduces_all_generators(monkeypatch):
    # seed_everything flips cuDNN flags; restore them after the test.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    utils.seed_everything(123)
    first = _draws()
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    utils.seed_everything(123)
    assert _draws() == first
    utils.seed_everything(124)
    assert _draws() != first


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True, "7"])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        utils.seed_everything(bad)


def _walk(value, found: set) -> None:
    found.add(type(value))
    if isinstance(value, dict):
        for item in value.values():
            _walk(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, found)


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    # Leave a cached second Gaussian in Python's and NumPy's generators: the state must carry it.
    random.gauss(0, 1)
    np.random.randn(1)
    state = utils.capture_rng_state()

    types_found: set = set()
    _walk(state, types_found)
    assert all(t in (dict, list, int, float, str, type(None), torch.Tensor) for t in types_found), types_found

    path = tmp_path / "rng.pth"
    torch.save({"rng_state": state}, path)
    expected = _draws()
    assert _draws() != expected  # the generators really moved on

    loaded = torch.load(path, weights_only=True)["rng_state"]
    utils.restore_rng_state(loaded)
    assert _draws() == expected


@pytest.mark.parametrize("bad, message", [
    ([1, 2], "must be a dict"),
    ({"python": {}}, "lacks version"),
    ({"version": 99, "python": {}, "numpy": {}, "torch": None}, "version 99"),
])
def test_restore_rng_state_rejects_foreign_data(bad, message):
    with pytest.raises(ValueError, match=message):
        utils.restore_rng_state(bad)


def test_restore_rng_state_without_cuda_warns_and_restores_cpu(caplog):
    state = utils.capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    expected = torch.rand(3)
    with caplog.at_level(logging.WARNING, logger="utils"):
        utils.restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in caplog.text


# --------------------------------------------------------------------------------------------------- atomic writes

def test_atomic_torch_save_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "latest_model.pth"
    utils.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    utils.atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["latest_model.pth"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_torch_save_crash_keeps_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "latest_model.pth"
    utils.atomic_torch_save({"epoch": 7, "w": torch.arange(5)}, path)

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        handle.flush()
        raise error

    monkeypatch.setattr(utils.torch, "save", crashing_save)
    with pytest.raises(type(error)):
        utils.atomic_torch_save({"epoch": 8}, path)
    monkeypatch.undo()

    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 7 and torch.equal(old["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest_model.pth"]


def test_atomic_write_text_exact_content_and_failed_replace(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    utils.atomic_write_text(path, "a,b\r\n1,2\n")
    assert path.read_bytes() == b"a,b\r\n1,2\n"

    def failing_replace(src, dst):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(utils.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        utils.atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_bytes() == b"a,b\r\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(TypeError):
        utils.atomic_write_text(path, b"bytes")


# --------------------------------------------------------------------------------------------------- devices / system

def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.resolve_device("auto") == torch.device("cpu")
    assert utils.resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        utils.resolve_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cuda', 'cuda:N' or 'cpu'"):
        utils.resolve_device("gpu")


def test_resolve_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert utils.resolve_device("auto") == torch.device("cuda")
    assert utils.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        utils.resolve_device("cuda:2")


def test_collect_system_info_cpu_is_json_safe():
    info = utils.collect_system_info(torch.device("cpu"))
    json.dumps(info, allow_nan=False)
    assert info["torch"] == torch.__version__
    assert info["python"].count(".") == 2
    assert info["monai"]  # installed in the project environment
    assert info["cpu_count"] >= 1 and 1 <= info["cpu_usable"] <= info["cpu_count"]
    assert 0 < info["ram_available_gb"] <= info["ram_total_gb"]
    assert info["gpu_name"] is None and info["device"] == "cpu"


def test_collect_system_info_cuda_reads_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(name="Fake H100"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (20 * utils.GB, 80 * utils.GB))
    info = utils.collect_system_info(torch.device("cuda", 0))
    assert info["gpu_name"] == "Fake H100"
    assert info["gpu_total_gb"] == 80.0 and info["gpu_free_gb"] == 20.0


def test_run_system_checks_quiet_when_resources_suffice(tmp_path):
    assert utils.run_system_checks(torch.device("cpu"), tmp_path, None, 0.0, min_free_disk_gb=0.0) == []


def test_run_system_checks_warns_on_low_disk_ram_and_gpu(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=100 * utils.GB,
                                                                                    used=99 * utils.GB,
                                                                                    free=1 * utils.GB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * utils.GB, 80 * utils.GB))
    with caplog.at_level(logging.WARNING, logger="utils"):
        warnings = utils.run_system_checks(torch.device("cuda"), tmp_path / "not" / "yet" / "created",
                                           estimated_gpu_gb=10.0, estimated_ram_gb=1e6)
    assert len(warnings) == 3
    disk, ram, gpu = warnings
    assert "1.0 GB free" in disk and "5 GB" in disk
    assert "below the estimated need" in ram
    assert "2.0 GB free of 80.0 GB" in gpu and "10.0 GB" in gpu
    assert all(w in caplog.text for w in warnings)

    # Enough GPU memory for the estimate -> no GPU warning.
    quieter = utils.run_system_checks(torch.device("cuda"), tmp_path, estimated_gpu_gb=1.5, estimated_ram_gb=0.0)
    assert len(quieter) == 1 and "free on the disk" in quieter[0]


def test_run_system_checks_turns_probe_failure_into_warning(tmp_path, monkeypatch):
    def broken(path):
        raise OSError("stale NFS handle")

    monkeypatch.setattr(utils.shutil, "disk_usage", broken)
    warnings = utils.run_system_checks(torch.device("cpu"), tmp_path, None, 0.0)
    assert len(warnings) == 1 and "stale NFS handle" in warnings[0]


# --------------------------------------------------------------------------------------------------- memory estimate

def test_estimate_training_memory_matches_worked_example():
    # Hand computation in the docstring: 1.25 * (1.50 + 2 * 1.47) GB.
    estimate = utils.estimate_training_memory_gb("sam_med3d_turbo", 2, False, False, 128)
    assert estimate == pytest.approx(5.54, abs=0.05)


def test_estimate_training_memory_orders_the_options():
    def est(**kw):
        args = dict(model_name="sam_med3d_turbo", batch_size=2, mixed_precision=False,
                    gradient_checkpointing=False, img_size=128)
        args.update(kw)
        return utils.estimate_training_memory_gb(**args)

    base = est()
    assert est(mixed_precision=True) < base
    assert est(gradient_checkpointing=True) < base
    assert est(freeze_encoder=True) < est(gradient_checkpointing=True)
    assert est(click_rounds=3) > base
    assert est(num_parameters=200_000_000) > base
    # Activations grow linearly with the batch; the weight state does not.
    assert est(batch_size=3) - est(batch_size=2) == pytest.approx(est(batch_size=2) - est(batch_size=1))
    assert est(batch_size=2) < 2 * est(batch_size=1)
    assert utils.estimate_training_memory_gb("tiny", 1, False, False, 64) < 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_name="vit_h"), "no memory profile"),
    (dict(batch_size=0), "batch_size"),
    (dict(img_size=100), "multiple of the patch size"),
])
def test_estimate_training_memory_rejects_bad_input(kwargs, message):
    args = dict(model_name="sam_med3d_turbo", batch_size=1, mixed_precision=False, gradient_checkpointing=False,
                img_size=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        utils.estimate_training_memory_gb(**args)


# --------------------------------------------------------------------------------------------------- time

@pytest.mark.parametrize("seconds, text", [
    (3723, "1h 02m 03s"), (3600, "1h 00m 00s"), (90061, "25h 01m 01s"), (125, "2m 05s"),
    (59.4, "59s"), (59.6, "1m 00s"), (0, "0s"),
])
def test_format_duration(seconds, text):
    assert utils.format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_format_duration_rejects_impossible(bad):
    with pytest.raises(ValueError):
        utils.format_duration(bad)


def test_eta_estimator_uses_moving_window():
    eta = utils.EtaEstimator(window=3)
    assert eta.eta_seconds(10) is None and eta.average_epoch_seconds is None
    eta.update(100.0)  # slow first epoch (cache filling)
    assert eta.eta_seconds(4) == pytest.approx(400.0)
    eta.update(10.0)
    eta.update(10.0)
    assert eta.eta_seconds(3) == pytest.approx(120.0)  # mean(100, 10, 10) = 40
    eta.update(10.0)  # the slow epoch leaves the window
    assert eta.average_epoch_seconds == pytest.approx(10.0)
    assert eta.eta_seconds(5) == pytest.approx(50.0)
    assert eta.eta_seconds(0) == 0.0
    with pytest.raises(ValueError):
        eta.eta_seconds(-1)
    with pytest.raises(ValueError):
        eta.update(float("nan"))
    with pytest.raises(ValueError):
        utils.EtaEstimator(window=0)


def test_eta_counts_the_validations_still_to_come():
    eta = utils.EtaEstimator(window=3)
    eta.update(10.0, validation_seconds=30.0)   # validation costs more than training here
    eta.update(10.0)                            # an epoch without validation
    assert eta.average_validation_seconds == pytest.approx(30.0)
    assert eta.eta_seconds(4, remaining_validations=2) == pytest.approx(4 * 10.0 + 2 * 30.0)
    assert eta.eta_seconds(4) == pytest.approx(40.0)
    with pytest.raises(ValueError):
        eta.update(1.0, validation_seconds=-1.0)


# --------------------------------------------------------------------------------------------------- memory monitor

def test_memory_monitor_tracks_sampled_peak_on_cpu(monkeypatch):
    # Real allocations are unreliable here (a long test process reuses freed, still-resident pages), so the
    # process's RSS readings are scripted: 1.0 GB at reset, 1.5 GB at a sample mid-epoch, 1.2 GB at the end.
    monitor = utils.MemoryMonitor(torch.device("cpu"))
    readings = iter([1.0, 1.5, 1.2, 1.2, 0.9, 0.9, 0.9])

    class Info:
        def __init__(self, gb):
            self.rss = int(gb * utils.GB)

    monkeypatch.setattr(monitor._process, "memory_info", lambda: Info(next(readings)))
    monitor.reset()                    # 1.0
    monitor.sample()                   # 1.5: the peak, gone by the time the epoch ends
    after = monitor.snapshot()         # samples 1.2, reports current 1.2
    assert after["peak_rss_gb"] == pytest.approx(1.5) and after["rss_gb"] == pytest.approx(1.2)
    assert after["peak_gpu_allocated_gb"] is None and after["peak_gpu_reserved_gb"] is None
    monitor.reset()                    # a new epoch forgets the old peak
    assert monitor.snapshot()["peak_rss_gb"] == pytest.approx(0.9)


def test_memory_monitor_reads_real_process_memory():
    snapshot = utils.MemoryMonitor(torch.device("cpu")).snapshot()
    assert 0 < snapshot["rss_gb"] <= snapshot["peak_rss_gb"]
    if sys.platform.startswith("linux"):
        assert snapshot["ru_maxrss_gb"] >= snapshot["rss_gb"] - 0.01


def test_memory_monitor_reads_cuda_peaks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * utils.GB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * utils.GB)
    monitor = utils.MemoryMonitor(torch.device("cuda", 0))
    monitor.reset()
    snap = monitor.snapshot()
    assert calls == [torch.device("cuda", 0)]
    assert snap["peak_gpu_allocated_gb"] == 3.0 and snap["peak_gpu_reserved_gb"] == 4.0


# --------------------------------------------------------------------------------------------------- summary JSON

def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_training_summary_converts_values(tmp_path):
    summary = {
        "best_dice": np.float32(0.75), "epochs": np.int64(12), "loss": float("nan"), "ratio": float("inf"),
        "lr": torch.tensor(1e-4), "curve": torch.tensor([0.5, 0.25]), "shape": (128, 128, 128),
        "output": tmp_path / "x", "flags": {"amp": np.bool_(True), 3: None}, "arr": np.array([1, 2]),
    }
    path = utils.write_training_summary(tmp_path, summary)
    assert path.parent == tmp_path
    assert re.fullmatch(r"training_summary_\d{8}-\d{6}\.json", path.name)
    data = _strict_json(path)
    assert data["best_dice"] == 0.75 and data["epochs"] == 12
    assert data["loss"] is None and data["ratio"] is None
    assert data["lr"] == pytest.approx(1e-4) and data["curve"] == [0.5, 0.25]
    assert data["shape"] == [128, 128, 128] and data["output"] == str(tmp_path / "x")
    assert data["flags"] == {"amp": True, "3": None} and data["arr"] == [1, 2]

    second = utils.write_training_summary(tmp_path, {"n": 1})  # same second: must not overwrite
    assert second != path and _strict_json(path)["epochs"] == 12


def test_write_training_summary_names_unconvertible_value(tmp_path):
    with pytest.raises(TypeError, match=r"summary\['model'\].*object"):
        utils.write_training_summary(tmp_path, {"model": object()})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- checkpoints

def test_cleanup_checkpoints_keeps_newest_by_epoch_number(tmp_path):
    for epoch in (1, 2, 3, 9, 10, 11):
        (tmp_path / f"checkpoint_epoch_{epoch}.pth").write_bytes(b"x")
    protected = ["best_model.pth", "latest_model.pth", "sam_encoder.pth", "checkpoint_epoch_final.pth"]
    for name in protected:
        (tmp_path / name).write_bytes(b"x")

    deleted = utils.cleanup_checkpoints(tmp_path, keep=3)
    # Numeric order: a string sort would keep 9, 3 and 2.
    assert sorted(p.name for p in deleted) == ["checkpoint_epoch_1.pth", "checkpoint_epoch_2.pth",
                                               "checkpoint_epoch_3.pth"]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted(protected + ["checkpoint_epoch_9.pth", "checkpoint_epoch_10.pth",
                                            "checkpoint_epoch_11.pth"])

    assert utils.cleanup_checkpoints(tmp_path, keep=3) == []
    utils.cleanup_checkpoints(tmp_path, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(protected)


def test_cleanup_checkpoints_never_touches_protected_names(tmp_path):
    for name in ("best_model.pth", "latest_model.pth", "sam_encoder.pth", "5.pth", "6.pth"):
        (tmp_path / name).write_bytes(b"x")
    utils.cleanup_checkpoints(tmp_path, keep=1, pattern="*.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6.pth", "best_model.pth", "latest_model.pth",
                                                         "sam_encoder.pth"]
    with pytest.raises(ValueError, match="keep"):
        utils.cleanup_checkpoints(tmp_path, keep=-1)
    with pytest.raises(ValueError, match="exactly one"):
        utils.cleanup_checkpoints(tmp_path, keep=1, pattern="checkpoint_*_*.pth")


# --------------------------------------------------------------------------------------------------- metrics.csv

def test_metrics_csv_new_columns_resume_and_truncate(tmp_path):
    path = tmp_path / "metrics.csv"
    log = utils.MetricsCsvLogger(path)
    log.append({"epoch": 1, "train_loss": 0.9, "lr": 1e-4})
    log.append({"epoch": 2, "train_loss": np.float32(0.5), "lr": 1e-4, "val_dice": 0.25})
    log.append({"epoch": 3, "train_loss": float("nan"), "lr": 5e-5})

    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,lr,val_dice"
    assert lines[1] == "1,0.9,0.0001," and len(lines) == 4

    resumed = utils.MetricsCsvLogger(path)
    rows = resumed.rows
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["val_dice"] is None and rows[1]["val_dice"] == 0.25
    assert rows[1]["train_loss"] == pytest.approx(0.5) and math.isnan(rows[2]["train_loss"])

    assert resumed.truncate_after(1) == 2
    assert [r["epoch"] for r in utils.MetricsCsvLogger(path).rows] == [1]
    resumed.append({"epoch": 2, "train_loss": 0.4, "val_loss": 0.3})
    final = utils.MetricsCsvLogger(path)
    assert final.columns == ["epoch", "train_loss", "lr", "val_dice", "val_loss"]
    assert [r["epoch"] for r in final.rows] == [1, 2] and final.rows[1]["val_loss"] == 0.3
    with pytest.raises(ValueError, match="epochs must increase"):
        final.append({"epoch": 2, "train_loss": 0.1})
    with pytest.raises(ValueError, match="'epoch'"):
        final.append({"train_loss": 0.1})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_metrics_csv_rejects_ragged_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,loss\n1,0.5,extra\n")
    with pytest.raises(ValueError, match="more cells"):
        utils.MetricsCsvLogger(path)


# --------------------------------------------------------------------------------------------------- pictures

def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def test_plot_learning_curves_tolerates_gaps(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.0, "lr": 1e-4},
        {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_dice": 0.2, "val_dice_1click": None,
         "lr": 1e-4},
        {"epoch": 3, "train_loss": float("nan"), "lr": 5e-5},
        {"epoch": 4, "train_loss": 0.6, "val_loss": 0.7, "val_dice": 0.4, "val_dice_1click": 0.5,
         "lr": 5e-5},
    ]
    path = tmp_path / "plots" / "learning_curves.png"
    utils.plot_learning_curves(history, path)
    image = _read_png(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100  # three panels side by side
    utils.plot_learning_curves([], tmp_path / "empty.png")
    assert _read_png(tmp_path / "empty.png").size > 0


def test_select_overlay_slices_prefers_most_blood():
    label = np.zeros((8, 8, 10), np.float32)
    pred = np.zeros_like(label)
    label[2:6, 2:6, 4] = 1  # 16 voxels
    label[3:5, 3:5, 7] = 1  # 4 voxels
    pred[1:7, 1:7, 2] = 1  # 36 voxels
    # The ground truth decides where blood is shown; the prediction only when there is no ground truth blood.
    assert utils.select_overlay_slices(label, pred, axis=2, num_slices=2, size=10) == [4, 7]
    assert utils.select_overlay_slices(np.zeros_like(label), pred, axis=2, num_slices=2, size=10) == [2]
    assert utils.select_overlay_slices(label, None, axis=2, num_slices=5, size=10) == [4, 7]
    assert utils.select_overlay_slices(np.zeros_like(label), None, axis=2, num_slices=3, size=10) == [5]
    assert utils.select_overlay_slices(None, None, axis=0, num_slices=3, size=8) == [4]


def test_save_overlay_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(32, 32, 12)).astype(np.float32)
    label = np.zeros_like(image)
    label[10:20, 10:20, 5:8] = 1
    pred = np.zeros_like(image)
    pred[12:22, 11:19, 6:9] = 1
    path = tmp_path / "overlay.png"
    utils.save_overlay_png(image, label, pred, path, "case 049 - Dice 0.61")
    assert _read_png(path).shape[1] > 200
    utils.save_overlay_png(torch.from_numpy(image), None, None, tmp_path / "plain.png", "no masks")
    assert _read_png(tmp_path / "plain.png").size > 0
    with pytest.raises(ValueError, match=r"label shape \(32, 32, 11\) does not match"):
        utils.save_overlay_png(image, label[..., :11], None, tmp_path / "bad.png", "bad")
    with pytest.raises(ValueError, match="3-D"):
        utils.save_overlay_png(image[None], None, None, tmp_path / "bad.png", "bad")
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------------------------------- logging

@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def _own_handlers(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_ichseg_handler", False)]


def test_setup_logging_rank0_is_idempotent(tmp_path, restore_root_logger, capsys):
    root = restore_root_logger
    utils.setup_logging(tmp_path)
    utils.setup_logging(tmp_path)
    own = _own_handlers(root)
    assert len(own) == 2
    assert sum(isinstance(h, logging.FileHandler) for h in own) == 1
    assert root.level == logging.INFO

    log = logging.getLogger("ichseg.test")
    with tqdm(total=3, file=sys.stderr) as bar:
        log.info("epoch 1 finished")
        bar.update(1)
    for handler in own:
        handler.flush()
    text = (tmp_path / "train.log").read_text()
    assert text.count("epoch 1 finished") == 1 and "INFO ichseg.test" in text
    assert capsys.readouterr().err.count("epoch 1 finished") == 1


def test_setup_logging_other_ranks_warn_only_without_file(tmp_path, restore_root_logger, capsys):
    root = restore_root_logger
    utils.setup_logging(tmp_path / "rank1", rank=1)
    assert root.level == logging.WARNING
    assert not (tmp_path / "rank1" / "train.log").exists()
    assert len(_own_handlers(root)) == 1
    log = logging.getLogger("ichseg.test")
    log.info("hidden on rank 1")
    log.warning("visible on rank 1")
    err = capsys.readouterr().err
    assert "hidden on rank 1" not in err and "[rank 1]" in err and "visible on rank 1" in err
