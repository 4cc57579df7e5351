"""Tests for tracking.py: offline wandb runs, resuming by run id, the no-op fallback and mode selection."""
from __future__ import annotations

import json
import logging
import math
import struct
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

import tracking
import reporting


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _records(run_file: Path):
    """Decode the records of a ``run-<id>.wandb`` file (LevelDB-log framing of wandb protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb run file"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: skip to the next block
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _history(run_file: Path) -> list[dict]:
    rows = []
    for record in _records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def _config(run_file: Path) -> dict:
    """The run's config: sent with the run record, later changes as config records."""
    config = {}
    for record in _records(run_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return config


def _wandb_children() -> list[str]:
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "wandb" in child.name() or "wandb" in " ".join(child.cmdline()):
                names.append(child.name())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return names


def test_offline_run_records_metrics_config_and_image(offline_wandb):
    out = offline_wandb / "run_out"
    png = offline_wandb / "curves.png"
    reporting.plot_learning_curves([{"epoch": 1, "train_loss": 1.0}], png)

    tracker = tracking.build_tracker(True, "ichseg-test", None, {"train": {"lr": 1e-4, "batch_size": 2},
                                                                 "data": {"spacing": (1.0, 1.0, 1.5)}}, out)
    assert isinstance(tracker, tracking.WandbTracker)
    assert tracker.run_id is None  # nothing is created before start()
    with pytest.raises(RuntimeError, match="before start"):
        tracker.log({"train_loss": 1.0}, step=0)
    tracker.start()
    assert tracker.mode == "offline"
    run_id = tracker.run_id
    assert run_id
    tracker.log({"train_loss": 0.5, "val_dice": np.float32(0.25), "skipped": None}, step=1)
    tracker.log({"train_loss": 0.4, "val_dice_1click": float("nan")}, step=2)
    tracker.log_image("val/overlay", png, step=2, caption="case 001")
    run_dir = tracker.run_dir
    tracker.finish()
    tracker.finish()  # idempotent

    assert run_dir.parent == out / "wandb"
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(run_id)
    run_file = run_dir / f"run-{run_id}.wandb"
    history = _history(run_file)
    assert [(row["_step"], row.get("train_loss")) for row in history] == [(1, 0.5), (2, 0.4)]
    assert history[0]["val_dice"] == 0.25 and "skipped" not in history[0]
    assert math.isnan(history[1]["val_dice_1click"])  # NaN reaches wandb rather than vanishing
    assert history[1]["val/overlay/_type"] == "image-file" and history[1]["val/overlay/caption"] == "case 001"
    config = _config(run_file)
    assert config["train"]["lr"] == 1e-4 and config["data"]["spacing"] == [1.0, 1.0, 1.5]
    assert _wandb_children() == []
    with pytest.raises(RuntimeError, match="after finish"):
        tracker.log({"x": 1.0}, step=3)


def test_resume_continues_the_same_run_id(offline_wandb):
    out = offline_wandb / "run_out"
    first = tracking.build_tracker(True, "ichseg-test", None, {"seed": 1}, out)
    first.start()
    run_id = first.run_id
    first.log({"train_loss": 0.9}, step=1)
    first.finish()

    # The trainer's order: build the tracker, load the checkpoint, then start with the saved id.
    second = tracking.build_tracker(True, "ichseg-test", None, {"seed": 1}, out)
    second.start(run_id=run_id)
    assert second.run_id == run_id
    second.log({"train_loss": 0.7}, step=2)
    second_dir = second.run_dir
    second.finish()

    # Offline, a resumed run is a second folder with the same id (wandb adds "-1" when both start in the same
    # second); `wandb sync` merges them into one run.
    run_dirs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert second_dir in run_dirs and len(run_dirs) == 2
    run_records = [r.run for r in _records(second_dir / f"run-{run_id}.wandb") if r.WhichOneof("record_type") == "run"]
    assert run_records and all(r.run_id == run_id for r in run_records)
    assert [row["train_loss"] for row in _history(second_dir / f"run-{run_id}.wandb")] == [0.7]
    assert _wandb_children() == []


def test_disabled_tracking_is_a_no_op(tmp_path):
    tracker = tracking.build_tracker(False, "ichseg-test", None, {}, tmp_path)
    assert isinstance(tracker, tracking.NullTracker) and tracker.run_id is None
    tracker.start(run_id="abc")
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_image("img", tmp_path / "missing.png", step=0)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_falls_back_with_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with caplog.at_level(logging.WARNING, logger="tracking"):
        tracker = tracking.build_tracker(True, "ichseg-test", None, {}, tmp_path)
    assert isinstance(tracker, tracking.NullTracker)
    assert "cannot be imported" in caplog.text


def test_context_manager_starts_and_marks_failure(offline_wandb):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        with tracking.build_tracker(True, "ichseg-test", None, {}, offline_wandb / "o") as tracker:
            assert tracker.run_id is not None
            tracker.log_image("img", offline_wandb / "missing.png", step=0)
    exits = [r.exit for r in _records(tracker.run_dir / f"run-{tracker.run_id}.wandb")
             if r.WhichOneof("record_type") == "exit"]
    assert [e.exit_code for e in exits] == [1]
    assert _wandb_children() == []


def test_unconvertible_config_fails_before_wandb_starts(tmp_path):
    with pytest.raises(TypeError, match=r"config\['model'\]"):
        tracking.build_tracker(True, "ichseg-test", None, {"model": object()}, tmp_path)
    with pytest.raises(ValueError, match="wandb mode"):
        tracking.build_tracker(True, "ichseg-test", None, {}, tmp_path, mode="cloud")


def test_resolve_wandb_mode(monkeypatch, tmp_path):
    probes = []

    def fake_probe(*args, **kwargs):
        probes.append(args)
        return reachable

    monkeypatch.setattr(tracking, "wandb_host_reachable", fake_probe)
    empty_netrc = tmp_path / "netrc"
    empty_netrc.write_text("")
    monkeypatch.setenv("NETRC", str(empty_netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)

    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        tracking.resolve_wandb_mode("auto")
    monkeypatch.delenv("WANDB_MODE")

    reachable = True
    assert tracking.resolve_wandb_mode("auto") == "offline"  # no key: offline without probing the network
    assert probes == []
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.resolve_wandb_mode("auto") == "online"
    reachable = False
    assert tracking.resolve_wandb_mode("auto") == "offline"
    assert tracking.resolve_wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="auto, online, offline, disabled"):
        tracking.resolve_wandb_mode("cloud")


def test_api_key_found_in_netrc(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login a password b\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not tracking.has_wandb_api_key()
    netrc_file.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert tracking.has_wandb_api_key()
    assert not tracking.has_wandb_api_key("https://wandb.mycompany.internal")
