"""Does fine-tuning start from what the pretrained weights learned? A stand-in for SAM-Med3D-turbo, measured on a CPU.

    python bench/transfer_bench.py                      # writes bench/results/transfer_bench.md

1. "Pretraining": the tiny build without the mask refiner is trained on cohort A and its SAM parts are saved
   in the *published* SAM-Med3D layout (a dict with ``model_state_dict`` holding image_encoder / prompt_encoder /
   mask_decoder only and a pickled ``argparse.Namespace`` under ``args``), exactly what the turbo file looks like.
2. Fine-tuning on cohort B (other shape, spacing and lesion sizes) at a fine-tuning rate, once from
   those weights (``--pretrained_checkpoint``; the refiner and representation head start fresh) and once from
   scratch (``--pretrained_checkpoint none``); a third run with ``--freeze_encoder`` must leave the encoder
   bit-identical. Reported: validation Dice on ICH-positive scans after epoch 1 and at the end.

tests/test_transfer.py runs step 2 on the suite's shared training run (its cohort is the pretraining cohort).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
import utils  # noqa: E402
from config import build_config  # noqa: E402
from model import read_trained_checkpoint  # noqa: E402
from modeling.checkpoint import read_checkpoint  # noqa: E402
from synthetic import SyntheticCohort, generate_cohort  # noqa: E402

logger = logging.getLogger("ichseg.transfer_bench")

SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
RunTraining = Callable[[list[str]], tuple[int, dict | None]]
COHORT_A = {"n_train": 16, "n_val": 4, "shape": (96, 96, 24), "spacing": (1.2, 1.2, 4.0), "seed": 7,
            "min_ml": 5.0, "max_ml": 40.0}
COHORT_B = {"n_train": 12, "n_val": 6, "shape": (80, 88, 20), "spacing": (2.0, 1.8, 5.0), "seed": 17,
            "min_ml": 10.0, "max_ml": 30.0}
RECIPE = ["--model", "tiny", "--device", "cpu", "--batch_size", "2", "--gradient_accumulation_steps", "1",
          "--scheduler_type", "cosine", "--warmup_epochs", "0", "--target_spacing", "2", "2", "2",
          "--num_workers", "0", "--seed", "0", "--val_every", "1", "--prompt_mode", "mixed", "--click_rounds", "2"]
# Pretraining learns from scratch at the CPU recipe's rate; fine-tuning uses a fine-tuning rate (the encoder's; the
# decoder then trains at 0.1x and the fresh refiner and head at --scratch_lr): at 2e-3 the first epoch of
# fine-tuning erased what the pretrained weights knew (measured: val Dice 0.000 after epoch 1 either way).
PRETRAIN_LR, FINETUNE_LR = "2e-3", "2e-4"


@dataclasses.dataclass
class TransferResult:
    pretrain_best_dice: float
    scratch: list[float]          # val Dice (ICH-positive scans) per epoch, from scratch
    pretrained: list[float]       # the same, fine-tuned from the published-layout file
    frozen_encoder_unchanged: bool
    loaded_report: str            # the log line naming what was loaded


def save_published_layout(trained: Path, target: Path) -> Path:
    """The SAM-Med3D parts of one of our checkpoints, saved the way SAM-Med3D's train.py saves turbo."""
    state = read_trained_checkpoint(trained)
    sam_only = {k: v for k, v in state["model_state_dict"].items() if k.startswith(SAM_PARTS)}
    torch.save({"epoch": int(state["epoch"]), "model_state_dict": sam_only, "optimizer_state_dict": {},
                "lr_scheduler_state_dict": {}, "losses": [], "dices": [], "best_loss": 0.0,
                "best_dice": float(state["best_metric"]),
                "args": argparse.Namespace(task_name="ichseg_transfer_bench", model_type="tiny", lr=2e-3),
                "used_datas": [str(trained)]}, target)
    return target


def _cohort(root: Path, spec: dict[str, Any]) -> SyntheticCohort:
    return generate_cohort(root, **spec)


def _files(cohort: SyntheticCohort) -> list[str]:
    return ["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir)]


def pretrain(work: Path, run_training: RunTraining, epochs: int) -> Path:
    """Step 1: the tiny build trained on cohort A without the refiner; returns its ``best_model.pth``.

    Without it because turbo's SAM parts segment on their own, and those of a model trained with the refiner do not
    (measured: val Dice 0.43 with the refiner, 0.004 from its SAM parts alone: the refiner's correction is learned
    together with the decoder's logits)."""
    cohort_a = _cohort(work / "cohort_a", COHORT_A)
    code, summary = run_training(_files(cohort_a) + RECIPE + [
        "--lr", PRETRAIN_LR, "--epochs", str(epochs), "--val_every", str(epochs), "--no-mask_refiner",
        "--output_dir", str(work / "pretrain")])
    assert code == 0 and summary is not None, "pretraining failed"
    return work / "pretrain" / "best_model.pth"


def compare_fine_tuning(work: Path, run_training: RunTraining, trained: Path, epochs: int,
                        cohort: dict[str, Any] = COHORT_B) -> TransferResult:
    """Step 2: ``trained`` (one of our checkpoints) saved in the published layout, then fine-tuned on ``cohort`` for
    ``epochs`` epochs beside a run from scratch, and one epoch with the encoder frozen."""
    published = save_published_layout(trained, work / "sam_med3d_tiny_published.pth")
    cohort_b = _cohort(work / "cohort_b", cohort)

    def finetune(name: str, *flags: str) -> dict:
        code, summary = run_training(_files(cohort_b) + RECIPE + [
            "--lr", FINETUNE_LR, "--epochs", str(epochs), "--output_dir", str(work / name), *flags])
        assert code == 0 and summary is not None, f"{name} failed"
        return summary

    scratch = finetune("scratch", "--pretrained_checkpoint", "none")
    pretrained = finetune("pretrained", "--pretrained_checkpoint", str(published))
    finetune("frozen", "--pretrained_checkpoint", str(published), "--freeze_encoder", "--epochs", "1")
    source = read_checkpoint(published)["model_state_dict"]
    after = read_trained_checkpoint(work / "frozen" / "latest_model.pth")["model_state_dict"]
    unchanged = all(torch.equal(after[k], v) for k, v in source.items() if k.startswith("image_encoder."))
    log = (work / "pretrained" / "train.log").read_text()
    loaded = next((line.split(": ", 1)[-1] for line in log.splitlines() if "tensors from" in line), "")

    def dice(run: dict) -> list[float]:
        return [h["val_dice"] for h in run["history"]]

    return TransferResult(pretrain_best_dice=float(read_trained_checkpoint(trained)["best_metric"]),
                          scratch=dice(scratch), pretrained=dice(pretrained), frozen_encoder_unchanged=unchanged,
                          loaded_report=loaded)


def run_transfer(work: Path, run_training: RunTraining, pretrain_epochs: int, finetune_epochs: int,
                 cohort_b: dict[str, Any] = COHORT_B) -> TransferResult:
    """Steps 1-2 of the module docstring. ``run_training(argv) -> (exit code, summary)`` runs train.py's pipeline
    (in-process in tests, so they share the interpreter)."""
    trained = pretrain(work, run_training, pretrain_epochs)
    return compare_fine_tuning(work, run_training, trained, finetune_epochs, cohort_b)


def markdown(result: TransferResult, command: str) -> str:
    return "\n".join([
        "# Transfer benchmark: fine-tuning from a published-layout checkpoint vs from scratch", "",
        f"Command: `{command}`  ",
        f"Recipe: `{shlex.join(RECIPE)}`, --lr {PRETRAIN_LR} to pretrain, {FINETUNE_LR} to fine-tune; cohort A "
        f"{COHORT_A}; cohort B {COHORT_B}  ",
        f"Pretraining on A reached val Dice {result.pretrain_best_dice:.3f}; loaded for fine-tuning: "
        f"{result.loaded_report}", "",
        "| start | val Dice after epoch 1 | final val Dice | best val Dice | epochs |",
        "|---|---|---|---|---|",
        f"| from scratch | {result.scratch[0]:.3f} | {result.scratch[-1]:.3f} | {max(result.scratch):.3f} | "
        f"{len(result.scratch)} |",
        f"| pretrained (published layout) | {result.pretrained[0]:.3f} | {result.pretrained[-1]:.3f} | "
        f"{max(result.pretrained):.3f} | {len(result.pretrained)} |", "",
        f"`--freeze_encoder` left the encoder bit-identical: {result.frozen_encoder_unchanged}", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/ichseg_transfer_bench"))
    parser.add_argument("--pretrain_epochs", type=int, default=60)
    parser.add_argument("--finetune_epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transfer_bench.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def run(flags: list[str]) -> tuple[int, dict | None]:
        config, warnings = build_config(flags)
        return train.run_training(config, warnings)

    result = run_transfer(args.work_dir, run, args.pretrain_epochs, args.finetune_epochs)
    command = shlex.join(["python", "bench/transfer_bench.py", *(argv if argv is not None else sys.argv[1:])])
    utils.atomic_write_text(args.out, markdown(result, command))
    utils.atomic_write_text(args.out.with_suffix(".json"), json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    logger.info("wrote %s\n%s", args.out, markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
