"""Data-parallel training: torchrun with 2 CPU processes (gloo) against one process on the same global batch.

The equivalence rests on two properties, each checked here: the train sampler uses one permutation for every
world size (rank r takes perm[r::world_size], so global step k of a 2-process run holds the scans of step k of a
single process with twice the batch), and every crop is seeded by (seed, epoch, dataset index), not by rank.
DDP averages the per-rank mean losses' gradients, which is the gradient of the mean over the global batch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataloader as D
import train
from config import DataConfig
from trainer import BEST_NAME, ENCODER_NAME, LATEST_NAME

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 180  # generous for a loaded 2-core CI machine; a healthy launch takes ~15 s


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from synthetic import generate_cohort

    # 3 validation scans over 2 ranks: the validation sampler repeats one scan, which must be counted once.
    return generate_cohort(tmp_path_factory.mktemp("ddp_cohort"), n_train=4, n_val=3, shape=(48, 48, 12),
                           spacing=(2.0, 2.0, 5.0), seed=4)


def run_args(cohort, output_dir: Path, batch_size: int, *extra: str) -> list[str]:
    return ["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir), "--output_dir", str(output_dir), "--model", "tiny", "--device", "cpu",
            "--batch_size", str(batch_size), "--gradient_accumulation_steps", "1", "--prompt_mode", "none",
            "--max_steps_per_epoch", "2", "--num_workers", "0", "--target_spacing", "4", "4", "4",
            "--lr", "1e-3", "--seed", "7", "--patience", "5", *extra]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc train.py args`` in its own session, killed whole on timeout.

    --standalone makes torchrun pick a free rendezvous port, so parallel test runs cannot clash.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "train.py", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: the session this call started
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s (a collective hang?)\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def test_rank_batches_interleave_into_the_single_process_batches(cohort, tmp_path):
    data_config = DataConfig(train_csv=str(cohort.train_csv), val_csv=str(cohort.val_csv),
                             mask_dir=str(cohort.mask_dir), cache_dir=str(tmp_path / "cache"),
                             target_spacing=(4.0, 4.0, 4.0), num_workers=0, augmentation_prob=1.0)
    data = D.validate_cohort(data_config)
    preprocessing = D.Preprocessing.from_config(data_config, 16)
    single, _ = D.build_dataloaders(data_config, preprocessing, data, 2, torch.device("cpu"), seed=7)
    ranks = [D.build_dataloaders(data_config, preprocessing, data, 1, torch.device("cpu"), seed=7, rank=r,
                                 world_size=2)[0]
             for r in (0, 1)]
    for epoch in (0, 1):
        for loader in (single, *ranks):
            D.set_epoch(loader, epoch)
        expected = list(single)
        per_rank = [list(loader) for loader in ranks]
        assert len(expected) == len(per_rank[0]) == len(per_rank[1]) == 2
        for step, batch in enumerate(expected):
            # Rank 0 holds the even positions of the permutation, rank 1 the odd ones.
            assert batch["case_id"] == per_rank[0][step]["case_id"] + per_rank[1][step]["case_id"]
            torch.testing.assert_close(batch["image"], torch.cat([r[step]["image"] for r in per_rank]))
            torch.testing.assert_close(batch["label"], torch.cat([r[step]["label"] for r in per_rank]))
    # The permutation does change with the epoch (set_epoch reaches the inner DistributedSampler).
    orders = []
    for epoch in range(4):
        D.set_epoch(single, epoch)
        orders.append([case for batch in single for case in batch["case_id"]])
    assert len({tuple(order) for order in orders}) > 1


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(cohort, tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"

    # 2 ranks × batch 1: epoch 1, then a second launch resumes for epoch 2 (all ranks load latest_model.pth).
    # Hard-case sampling is on: epoch 2's draws depend on every rank's epoch-1 losses, pooled. So is false-positive
    # mining: epoch 2 starts with each rank mining half the scans, and both ranks crop from the pooled result.
    hard_cases = ("--hard_case_fraction", "0.5", "--false_positive_crop_fraction", "0.5",
                  "--false_positive_mining_every", "1")
    first = torchrun(run_args(cohort, ddp_dir, 1, "--epochs", "1", *hard_cases))
    assert first.returncode == 0, first.stdout[-4000:]
    resumed = torchrun(run_args(cohort, ddp_dir, 1, "--epochs", "2", "--resume", "auto", *hard_cases))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed from" in resumed.stdout
    # One process × batch 2, both epochs straight through, on one thread like each rank: on a busy 2-core
    # machine a multi-threaded CPU step was measured 10x slower than a single-threaded one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(run_args(cohort, single_dir, 2, "--epochs", "2", *hard_cases)) == 0
    finally:
        torch.set_num_threads(threads)

    ddp = torch.load(ddp_dir / LATEST_NAME, map_location="cpu", weights_only=True)
    one = torch.load(single_dir / LATEST_NAME, map_location="cpu", weights_only=True)
    assert ddp["epoch"] == one["epoch"] == 2
    assert ddp["global_step"] == one["global_step"] == 4
    # Each rank folded in the other's losses: the same running loss per scan as one process over the whole batch.
    assert ddp["hard_cases"]["running"].keys() == one["hard_cases"]["running"].keys()
    assert ddp["hard_cases"]["running"] == pytest.approx(one["hard_cases"]["running"], rel=1e-3)
    assert ddp["false_positive_mining"]["mined_at"] == one["false_positive_mining"]["mined_at"] == 1
    assert ddp["false_positive_mining"]["indices"].keys() == one["false_positive_mining"]["indices"].keys()
    state = ddp["model_state_dict"]
    assert not [key for key in state if key.startswith("module.")]  # saved unwrapped, loadable without DDP
    assert state.keys() == one["model_state_dict"].keys()
    # The gradients agree: Adam's running moments are linear in them (first) or in their squares (second).
    # Tolerance: float rounding of a different summation order (per-rank convolutions, then an all-reduce).
    adam_ddp, adam_one = ddp["optimizer_state_dict"]["state"], one["optimizer_state_dict"]["state"]
    assert adam_ddp.keys() == adam_one.keys() and {int(s["step"]) for s in adam_ddp.values()} == {4}
    for moment in ("exp_avg", "exp_avg_sq"):
        scale = max(float(s[moment].abs().max()) for s in adam_one.values())
        assert scale > 0  # real gradients flowed (else agreement would prove nothing)
        for index, expected in adam_one.items():
            torch.testing.assert_close(adam_ddp[index][moment], expected[moment], rtol=1e-3, atol=1e-5 * scale)
    # The weights agree to float rounding almost everywhere. Not everywhere: Adam divides each gradient by its
    # own running magnitude, so an element whose gradient is zero up to rounding (e.g. a bias in front of a
    # softmax) takes a step of random size and sign. A wrong global batch moves nearly every element.
    differences = torch.cat([(state[k] - v).abs().flatten() for k, v in one["model_state_dict"].items()
                             if v.is_floating_point()])
    assert float((differences > 1e-6).float().mean()) < 1e-2

    # Train loss all-reduced over ranks; validation gathered over shards with the repeated scan counted once
    # (val_loss is a mean over scans, so a doubly counted scan would shift it). Dice thresholds the logits, so a
    # voxel at 0 may flip between the runs: compared loosely.
    for mine, theirs in zip(ddp["history"], one["history"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3), key
        for key in ("val_dice", "val_dice_1click"):
            assert mine[key] == pytest.approx(theirs[key], abs=0.02, nan_ok=True), key

    # Rank 0 alone wrote outputs: the same files as the single process, plus one summary per launch.
    def outputs(folder: Path) -> set[str]:
        return {p.name for p in folder.iterdir() if not p.name.startswith("training_summary_")}

    assert outputs(ddp_dir) == outputs(single_dir)
    assert {LATEST_NAME, BEST_NAME, ENCODER_NAME, "train.log", "metrics.csv"} <= outputs(ddp_dir)
    summaries = sorted(ddp_dir.glob("training_summary_*.json"))
    assert len(summaries) == 2
    log = (ddp_dir / "train.log").read_text()
    assert "[rank 1]" not in log and log.count("resumed from") == 1 and "data wait" in log
    assert len((ddp_dir / "metrics.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    summary = json.loads(summaries[-1].read_text())
    assert summary["epochs_completed"] == 2 and 0.0 <= summary["data_wait_fraction"] <= 1.0
