"""``train.py --test`` with data flags (usercheck.py) and the PASS/FAIL/SKIP report (checks.py).

The turbo cases run the CLI in a subprocess: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is
imported, so only a fresh interpreter sees the local cache the test builds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

import selftest
import train
import usercheck
from checks import Check, format_report
from config import build_config
from synthetic import generate_cohort

ROOT = Path(__file__).resolve().parents[1]
# Names and shapes of the published SAM-Med3D-turbo checkpoint (a copy of ../shared/reference's file).
TSV = Path(__file__).resolve().parent / "data" / "sam_med3d_turbo_state_dict.tsv"
TURBO_REPO_FOLDER = "models--blueyo0--SAM-Med3D"
REVISION = "0123456789abcdef0123456789abcdef01234567"
MEASURED = ("cohort", "model", "system", "data loading", "training steps", "data wait", "validation window",
            "peak memory", "epoch time")


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("cohort"), n_train=4, n_val=2, shape=(48, 48, 12),
                           spacing=(3.0, 3.0, 5.0), seed=1)


def data_flags(cohort, output_dir: Path, *extra: str) -> list[str]:
    return ["--test", "--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir), "--output_dir", str(output_dir), "--device", "cpu", "--num_workers", "0", *extra]


# ------------------------------------------------------------------------------------------------ the report

def test_a_skipped_check_reads_skip_and_does_not_fail_the_report():
    checks = [Check("training run", True, "exit code 0"), Check.skip("BLIP-2 Q-Former", "transformers not installed")]
    report = format_report("title", checks, 3.0)
    assert "PASS  training run" in report and "SKIP  BLIP-2 Q-Former" in report and "PASS  BLIP" not in report
    assert report.rstrip().splitlines()[-1] == "PASS in 3 s"
    failed = format_report("title", [*checks, Check("cohort", False, "2 problems:\nrow 1\nrow 2")], 1.0)
    assert failed.rstrip().splitlines()[-1] == "FAIL in 1 s"
    assert "\n" + " " * 23 + "row 2" in failed  # continuation lines stay in the detail column


def test_test_flag_checks_the_users_run_only_when_given_data(monkeypatch):
    monkeypatch.setattr(selftest, "run_user_check", lambda config: 42)

    def no_training(*args, **kwargs):
        raise AssertionError("the synthetic self-test ran")

    with_data, _ = build_config(["--test", "--train_csv", "train.csv"])
    assert usercheck.has_data_flags(with_data)
    assert selftest.run_self_test(with_data, no_training) == 42
    without, _ = build_config(["--test"])
    assert not usercheck.has_data_flags(without)


# -------------------------------------------------------------------------------------------------- estimates

@pytest.mark.parametrize("shape", [(96, 96, 40), (128, 128, 128), (154, 154, 100), (40, 300, 129), (10, 10, 10)])
def test_window_count_matches_monai_sliding_window(shape):
    roi = 128
    padded = [max(n, roi) for n in shape]  # sliding_window_inference pads to the window first
    interval = _get_scan_interval(padded, [roi] * 3, 3, [usercheck.SLIDING_WINDOW_OVERLAP] * 3)
    assert usercheck.sliding_window_count(shape, roi) == len(dense_patch_slices(padded, [roi] * 3, interval))


def test_epoch_estimate_is_training_steps_plus_validation():
    assert usercheck.steps_per_epoch(75, 2, None) == 38
    assert usercheck.steps_per_epoch(75, 2, 10) == 10
    assert usercheck.validation_seconds([4, 1], 0.5, clicks=5) == pytest.approx((9 + 6) * 0.5)
    assert usercheck.epoch_seconds(38, 1.0, 10.0, val_every=2) == pytest.approx(43.0)


# ---------------------------------------------------------------------------------------------- the user's run

def test_check_of_own_cohort_passes_and_writes_only_the_report(small_cohort, tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(data_flags(small_cohort, out, "--model", "tiny", "--batch_size", "2"))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == [usercheck.REPORT_NAME]
    for name in MEASURED:
        assert f"PASS  {name}" in printed, name
    assert "SKIP  weights" in printed and "FAIL" not in printed  # tiny has no published weights: nothing to check
    assert printed.rstrip().splitlines()[-1].startswith("PASS in")

    report = json.loads((out / usercheck.REPORT_NAME).read_text())
    assert report["passed"] is True and report["exit_code"] == 0
    assert [c["name"] for c in report["checks"]] == ["settings", "weights", *MEASURED]
    m = report["measurements"]
    assert m["steps"] == 2 and m["s_per_step"] > 0 and 0.0 <= m["data_wait_fraction"] <= 1.0
    assert 0 < m["peak_rss_gb"] < m["ram_total_gb"] and m["validation_window_s"] > 0
    assert m["steps_per_epoch"] == 2 and m["est_epoch_s"] > m["steps_per_epoch"] * m["s_per_step"]
    assert report["config"]["data"]["train_csv"] == str(small_cohort.train_csv)


def test_check_of_invalid_cohort_fails_and_skips_the_rest(small_cohort, tmp_path, capsys):
    broken = tmp_path / "train.csv"
    broken.write_text(small_cohort.train_csv.read_text() + f"{tmp_path / 'missing.pkl'},0,P9999\n")
    out = tmp_path / "run"
    argv = data_flags(small_cohort, out, "--model", "tiny")
    argv[argv.index("--train_csv") + 1] = str(broken)
    assert train.main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAIL  cohort" in printed and "missing.pkl" in printed
    assert "SKIP  training steps" in printed and "PASS  training steps" not in printed
    assert json.loads((out / usercheck.REPORT_NAME).read_text())["exit_code"] == 1


# ----------------------------------------------------------------------------------- turbo weights, offline

def write_turbo_stand_in(cache: Path) -> Path:
    """A Hugging Face cache holding a file in the published sam_med3d_turbo.pth layout: the real names and shapes
    (the TSV), small random values, ``model_state_dict`` plus a pickled ``argparse.Namespace``."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for line in TSV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, _dtype = line.split("\t")
            state[key] = 0.02 * torch.randn(*(int(s) for s in shape.split("x")), generator=generator)
    repo = cache / TURBO_REPO_FOLDER
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    torch.save({"model_state_dict": state, "args": argparse.Namespace(model_type="vit_b_ori", img_size=128)},
               snapshot / "sam_med3d_turbo.pth")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot / "sam_med3d_turbo.pth"


def run_cli_offline(argv: list[str], hub_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HUGGINGFACE_HUB_CACHE", None)  # the older name would win over ours in some huggingface_hub releases
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_check_loads_the_cached_turbo_weights_offline_and_trains(small_cohort, tmp_path):
    cache = tmp_path / "hub"
    weights = write_turbo_stand_in(cache)
    out = tmp_path / "run"
    # Turbo on a CPU: ~3 s per 128³ step, so one step (--max_steps_per_epoch 1) and the one validation window.
    result = run_cli_offline(data_flags(small_cohort, out, "--batch_size", "1", "--max_steps_per_epoch", "1"), cache)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"loaded 324 tensors from {weights}" in log and "sha256" in log
    for name in ("weights", *MEASURED):
        assert f"PASS  {name}" in result.stdout, name
    assert sorted(p.name for p in out.iterdir()) == [usercheck.REPORT_NAME]
    report = json.loads((out / usercheck.REPORT_NAME).read_text())
    assert report["config"]["model"]["pretrained_checkpoint"] == "turbo"
    assert report["measurements"]["parameters"] > 100_000_000 and report["measurements"]["steps"] == 1


@pytest.mark.slow
def test_check_with_an_empty_cache_exits_2_before_any_data_work(small_cohort, tmp_path):
    out = tmp_path / "run"
    result = run_cli_offline(data_flags(small_cohort, out), tmp_path / "empty-hub")
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-4000:]
    assert "FAIL  weights" in result.stdout and "./checkpoints/sam_med3d_turbo.pth" in result.stdout
    assert "HF_HUB_OFFLINE" in result.stdout
    assert "SKIP  cohort" in result.stdout and "validated" not in log  # the cohort was never read
    assert json.loads((out / usercheck.REPORT_NAME).read_text())["exit_code"] == 2
