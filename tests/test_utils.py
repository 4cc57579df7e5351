"""Tests for utils.py: seeding/RNG state, atomic writes, devices and system checks, checkpoint retention and
logging."""
from __future__ import annotations

import errno
import json
import logging
import random
import sys
import types

import numpy as np
import pytest
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import utils


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


def _disk_full_direct():
    raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full_inside_torch():
    # What torch.save does when a write fails: its own RuntimeError, the OSError only as the context.
    try:
        _disk_full_direct()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("fail", [_disk_full_direct, _disk_full_inside_torch])
def test_disk_full_is_one_line_saying_what_to_free_and_keeps_the_previous_file(tmp_path, monkeypatch, fail):
    path = tmp_path / "latest_model.pth"
    utils.atomic_torch_save({"epoch": 7, "w": torch.zeros(2**18)}, path)   # 1 MB of tensors

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        fail()

    monkeypatch.setattr(utils.torch, "save", full_disk)
    with pytest.raises(utils.DiskFullError) as info:
        utils.atomic_torch_save({"epoch": 8, "w": torch.zeros(2**18)}, path)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert message.startswith(f"disk full while writing {path}: free ")
    assert f" on {utils.mount_point(path)} (the file takes about 1 MB" in message
    assert "latest_model.pth still holds its previous content" in message
    assert torch.load(path, weights_only=True)["epoch"] == 7
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


def test_setup_logging_rank0_is_idempotent(tmp_path, restore_root_logger, capsys, monkeypatch):
    root = restore_root_logger
    utils.setup_logging(tmp_path)
    utils.setup_logging(tmp_path)
    own = _own_handlers(root)
    assert len(own) == 2
    assert sum(isinstance(h, logging.FileHandler) for h in own) == 1
    assert root.level == logging.INFO

    log = logging.getLogger("ichseg.test")
    written = []
    real_write = tqdm.write

    def spy(message, *args, **kwargs):
        written.append(message)
        return real_write(message, *args, **kwargs)

    monkeypatch.setattr(tqdm, "write", spy)
    with tqdm(total=3, file=sys.stderr) as bar, logging_redirect_tqdm():
        log.info("epoch 1 finished")    # through tqdm.write, which clears and redraws the bar around it
        bar.update(1)
    assert all(h in root.handlers for h in own)   # the console handler is back after the bars
    log.info("after the bars")
    for handler in own:
        handler.flush()
    text = (tmp_path / "train.log").read_text()
    assert text.count("epoch 1 finished") == 1 and "INFO ichseg.test" in text and "after the bars" in text
    assert len(written) == 1 and "epoch 1 finished" in written[0]
    err = capsys.readouterr().err
    assert err.count("epoch 1 finished") == 1 and err.count("after the bars") == 1


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
