"""Does the documented CPU recipe produce a good segmenter on cohorts it was not tuned on? Trains it on several
synthetic cohorts and scores each against a plain MONAI U-Net given the same wall-clock budget.

    python bench/learning_bench.py                               # all cohorts, writes bench/results/learning_bench.md
    python bench/learning_bench.py --cohorts repro --extra_flags=--no-mask_refiner --label "no refiner"
    python bench/learning_bench.py --seeds 0 1 2                 # every cohort trained with three seeds, and their mean

For every cohort: generate it (``synthetic.py``, cached in --work_dir), train with ``train.py`` and the README's CPU
recipe (``RECIPE``), evaluate ``best_model.pth`` with ``predict.py --mask_dir`` (its defaults: a mirror-averaged
prompt-free answer) on the validation scans in their original grid (prompt-free and after 1/3/5 simulated clicks),
then train the U-Net of ``bench/unet_baseline.py`` for the same wall time (``--unet_budget_s match``; or a fixed
number of seconds) and score it the same way. Reported
per cohort: Dice on ICH-positive scans, Dice after 1/3/5 clicks, ICH-negative scans predicted empty (volume <= 0.1
mL), false-positive mL on negatives, mean |volume error| on positives, the first validated epoch with Dice > 0.5
(preprocessed grid), the training wall time, and the Dice of the SAM decoder's own answer read alone
(``bench/decoder_probe.py``: near 0 when the mask refiner has become the whole segmenter).
Results go to <out>.md (a Markdown table with the command) and <out>.json.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from synthetic import Appearance, generate_cohort  # noqa: E402
from unet_baseline import train_unet  # noqa: E402

import metrics  # noqa: E402
from report import format_number  # noqa: E402
import utils  # noqa: E402

logger = logging.getLogger("ichseg.learning_bench")

# The README's CPU recipe for the tiny build (everything else at its default).
# Sized for 5 minutes on 2 CPU cores (the history below is in order; the last paragraph is today's recipe): 400
# steps of 2 crops (an epoch is capped at 10 steps so the run length does not grow with the cohort), one click
# round in the interactive half of the batches, validation once. Volumes are
# resampled to 1.5 mm, SAM-Med3D's pretraining spacing: at 2 mm repro scored 0.663 against 0.806 (50 epochs each),
# its subdural crescents 0.14 / 0.49 against 0.36 / 0.75 (thinner partial-volume rims at the skull). The fresh
# parts (refiner, head) at twice the encoder's rate: with the decoder's deep supervision (train default 0.3),
# --scratch_lr 2e-3 gave multifocal 0.780 and an 11 mL streak false positive on a ctich negative, 4e-3 gave 0.820
# and every negative empty (repro 0.799 -> 0.741: its one subdural scan missed; results/learning_bench.md).
# The cross-entropy over the hardest 10 % of each crop's voxels (TopK): multifocal 0.793 / 0.710 -> 0.855 / 0.872
# over seeds 0 / 1, its subdural crescents found. The hemorrhage weight's cap falls from 10 to 1 over the run
# (--final_hemorrhage_weight 1): over seeds 0 / 1 / 2 ctich 0.882 -> 0.922 with its streak negative empty 2 of 3,
# thin 0.891 -> 0.931, volume errors halved, repro 0.761 -> 0.773, multifocal 0.852 -> 0.825 (every seed >= 0.80);
# the held-out cohort 0.780 -> 0.759. Every crop gets one of the training set's own bleeds pasted at a random
# head-tissue position (--lesion_paste_prob 1, data/lesion_paste.py): over seeds 0 / 1 / 2 repro 0.773 -> 0.875
# (its missed crescent found with every seed), multifocal 0.825 -> 0.857, holdout 0.759 -> 0.816, ctich and thin
# level, at a cost: ctich's streak negative not empty with any seed (9 of 12 negatives, from 11).
# One validation, at the end: the last epoch was the best in every
# benchmark run with two, and validation does not change what is trained. Measured and not (yet) in the recipe:
# --in_plane_rotation_deg 180, --hard_negative_crop_fraction 0.5 with --empty_crop_dice_volume 0.01, all three
# together, --min_component_peak, --hard_case_fraction (repro's crescent found with every seed, the other cohorts
# 0.01-0.03 lower, the held-out cohort 0.035 lower), --scale_augmentation 0.3 and --final_hemorrhage_weight 3
# (ctich's streak negative not empty with two seeds of three) (results/learning_bench.md, "Opt-in options",
# "Re-measured", "Hard-case sampling" and "A held-out cohort").
# Fifth session of 2026-11-29: 1,000 steps instead of 400 and the cross-entropy over every voxel instead of the
# hardest 10 % (TopK was what got 400 steps off the empty answer; with 1,000 it is not needed and holdout's crescent
# is found with it off): every one of 21 runs on the seven earlier cohorts at Dice >= 0.80 (from 18), mean of the
# cohort means 0.872 -> 0.913, 170-201 s of training of the 300 s budget; thin's negatives 12/12 -> 9/12.
# Sixth session: no change. The streak false positives left were screened (--hard_case_fraction 0.5, paste into
# half or none of the crops, 1,300 steps, a whole-crop refiner context, ...): none cures them on every cohort
# (results/learning_bench.md, "Why the streaks stay"). Seventh session: no change. Crop-level false-positive mining
# (--false_positive_crop_fraction, mining.py), alone, every 10 epochs and with a whole-crop refiner context, left
# the streaks where they were; 3,000 steps (over the budget) shrank or cleared them on four failing runs
# (results/learning_bench.md, "Crop-level false-positive mining").
# Eighth session: no change (cheaper CPU kernels; the whole 5-minute budget passes nothing). Ninth session: the crops
# of ICH-negative scans stay blood-free (--lesion_paste_into_negatives 0) and a blood-free crop's false positives are
# charged as Dice charges them beside a bleed (--empty_crop_dice_volume 0.01): over three seeds on every cohort, ctich
# (negatives 9/12 -> 11/12) and thin (9/12 -> 12/12) meet the bar, repro, multifocal and fresh keep it (5 of 9
# cohorts, from 3), eighth 0.755 -> 0.797 (negatives 15/15); the cost is holdout's 30 mL crescent (holdout 0.893 ->
# 0.800, two seeds under 0.80) and 0.01-0.03 of Dice on repro, unseen and fresh; unseen's and ninth's streak negatives
# stay (results/learning_bench.md, first section).
# Tenth session: no change. Two opt-in options screened on the four failing cohorts (seed 0): streak artefacts in the
# training crops (--streak_augmentation_prob, data/artefacts.py) empty the streak negatives (ninth 026 40 -> 0 mL) and
# the bands beside eighth's bleeds, and cost the faint crescents (holdout 034 lost with every variant); pastes against
# the crop's bone (--lesion_paste_at_bone) bring eighth's crescents back and ninth's streak with them. Streak and
# crescent share a density (58-59 HU on 29 HU brain). --streak_augmentation_prob 1 alone, seed 0 on all nine cohorts:
# the bar met on six (the recipe's seed 0: four), mean Dice 0.884 -> 0.841 (faint bleeds predicted small); with
# seed 1 ninth 026 and unseen 033 come back shrunk (5.8, 0.4 mL): a lead, not a recipe (results/learning_bench.md,
# first section).
RECIPE = ["--model", "tiny", "--device", "cpu", "--epochs", "100", "--max_steps_per_epoch", "10", "--lr", "2e-3",
          "--scratch_lr", "4e-3", "--gradient_accumulation_steps", "1", "--scheduler_type", "cosine",
          "--warmup_epochs", "1", "--click_rounds", "1", "--target_spacing", "1.5", "1.5", "1.5",
          "--final_hemorrhage_weight", "1", "--lesion_paste_prob", "1", "--lesion_paste_into_negatives", "0",
          "--empty_crop_dice_volume", "0.01", "--val_every", "100", "--seed", "0"]


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    description: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    seed: int
    min_ml: float
    max_ml: float
    appearance: Appearance = Appearance()
    n_train: int = 20
    n_val: int = 10


ALL_KINDS = ("ellipsoid", "lobulated", "subdural", "intraventricular", "irregular")


def _held_out(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int, max_ml: float,
              **appearance: Any) -> CohortSpec:
    """The held-out cohorts' shared design: 24 + 12 scans, bleeds from 3 mL, all five kinds (intraventricular half
    as often), separate foci; ``appearance`` sets the rest (contrast, noise, streaks, foci). The description is
    written from these values, so it cannot disagree with them."""
    look = Appearance(lesion_kinds=ALL_KINDS, kind_weights=(2, 2, 2, 1, 2), separate_foci=True, **appearance)
    foci = f"{'up to ' if look.max_foci > 2 else ''}{look.max_foci} foci in {100 * look.multifocal_fraction:g} %"
    description = (f"held out: {'×'.join(map(str, shape))} at {'×'.join(f'{s:g}' for s in spacing)} mm, "
                   f"3–{max_ml:g} mL, all five kinds, {foci}, blood {look.blood_hu[0]:g}–{look.blood_hu[1]:g} HU, "
                   f"noise {look.noise_hu[0]:g}–{look.noise_hu[1]:g} HU, streaks in {100 * look.streak_fraction:g} "
                   "%; 24 + 12 scans")
    return CohortSpec(description, shape, spacing, seed=seed, min_ml=3, max_ml=max_ml, n_train=24, n_val=12,
                      appearance=look)


COHORTS: dict[str, CohortSpec] = {
    "repro": CohortSpec("the learning issue's reproduction: 160×160×28 at 1.6×1.6×5 mm, 3–12 mL, 1–2 foci",
                        (160, 160, 28), (1.6, 1.6, 5.0), seed=3, min_ml=3, max_ml=12),
    "ctich": CohortSpec("CT-ICH-like: 512×512×30 at 0.45×0.45×5 mm, 3–22 mL, bright bleeds, subdural and irregular, "
                        "streaks in 30 %", (512, 512, 30), (0.45, 0.45, 5.0), seed=21, min_ml=3, max_ml=22,
                        appearance=Appearance(lesion_kinds=("ellipsoid", "lobulated", "subdural", "irregular"),
                                              kind_weights=(3, 2, 2, 2), blood_hu=(65, 90), streak_fraction=0.3)),
    # 40 + 16 scans: at 20 + 10 the draw gave validation 4 subdurals of 6 bleeds and training one, which neither
    # ichseg nor the U-Net baseline could segment (both Dice 0 on all four): a test of one-shot learning.
    "multifocal": CohortSpec("192×192×40 at 1.0×1.0×5 mm, 3–40 mL, up to 3 separate foci in 40 %, all five kinds, "
                             "low-contrast blood 55–85 HU, noise 4–10 HU, streaks in 30 %; 40 + 16 scans",
                             (192, 192, 40), (1.0, 1.0, 5.0), seed=11, min_ml=3, max_ml=40, n_train=40, n_val=16,
                             appearance=Appearance(lesion_kinds=ALL_KINDS, kind_weights=(3, 2, 2, 1, 2), max_foci=3,
                                                   multifocal_fraction=0.4, separate_foci=True, blood_hu=(55, 85),
                                                   noise_hu=(4, 10), streak_fraction=0.3)),
    "thin": CohortSpec("thinner slices: 128×128×72 at 1.5×1.5×2.5 mm, 5–40 mL, 2 foci in 30 %, noisy (6–12 HU)",
                       (128, 128, 72), (1.5, 1.5, 2.5), seed=31, min_ml=5, max_ml=40,
                       appearance=Appearance(lesion_kinds=("ellipsoid", "lobulated", "intraventricular", "irregular",
                                                           "subdural"), kind_weights=(1, 1, 1, 1, 1),
                                             multifocal_fraction=0.3, separate_foci=True, noise_hu=(6, 12))),
    # Made after every recipe choice of the four above and used to choose nothing until --lesion_paste_prob, whose
    # value was explored on its seed 0 (so it is no longer unseen: see "unseen" below).
    "holdout": _held_out((256, 256, 36), (0.9, 0.9, 4.0), seed=41, max_ml=30, multifocal_fraction=0.3,
                         blood_hu=(58, 88), noise_hu=(5, 9), streak_fraction=0.2),
    # Made on 2026-11-29 before --lesion_paste_prob was chosen, and first run after the choice, once with each
    # recipe: the held-out check of that choice (a grid, slice thickness and mix of its own).
    "unseen": _held_out((384, 384, 32), (0.6, 0.6, 4.5), seed=51, max_ml=25, multifocal_fraction=0.3,
                        blood_hu=(60, 85), noise_hu=(4, 8), streak_fraction=0.25),
    # Made on 2026-11-29 (fourth session) before any run on it, when the next recipe change was explored on the
    # cohorts above; first run after that choice, once with each recipe compared.
    "fresh": _held_out((320, 320, 26), (0.7, 0.7, 6.0), seed=61, max_ml=20, multifocal_fraction=0.25,
                       blood_hu=(58, 85), noise_hu=(5, 9), streak_fraction=0.3),
    # Made on 2026-11-29 (fifth session) before any run on it, while a longer schedule was explored on ctich,
    # holdout and fresh; first run after that choice, once with each recipe compared.
    "eighth": _held_out((288, 288, 30), (0.8, 0.8, 5.0), seed=71, max_ml=35, max_foci=3, multifocal_fraction=0.35,
                        blood_hu=(56, 86), noise_hu=(4, 9), streak_fraction=0.35),
    # Made on 2026-11-29 (sixth session) before any run on it, while the streak false positives were screened on
    # the cohorts above; run once with the recipe in force after those screens, and to be run once with the next
    # recipe candidate: the held-out check of the next choice.
    "ninth": _held_out((224, 224, 48), (1.0, 1.0, 3.0), seed=81, max_ml=30, multifocal_fraction=0.3,
                       blood_hu=(57, 87), noise_hu=(5, 10), streak_fraction=0.3),
}


def _run(command: list[str], log_path: Path) -> float:
    """Run a command, its output into ``log_path``; returns wall seconds; raises on a non-zero exit."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {code}; see {log_path}")
    return time.perf_counter() - started


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return [{k: (float(v) if k != "file" and v not in ("", None) else v) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def _scores(rows: list[dict[str, Any]], clicks: tuple[int, ...]) -> dict[str, Any]:
    positives = [r for r in rows if r["volume_true_ml"] > 0]
    negatives = [r for r in rows if r["volume_true_ml"] == 0]
    summary = metrics.summarize(rows)
    result = {
        "dice": summary["dice_positive"],
        "negatives_empty": f"{sum(r['volume_pred_ml'] <= metrics.DEFAULT_DETECTION_THRESHOLD_ML for r in negatives)}"
                           f"/{len(negatives)}",
        "fp_ml": summary["negative_fp_ml"],
        "volume_error_ml": sum(abs(r["volume_error_ml"]) for r in positives) / max(len(positives), 1),
    }
    for k in clicks:
        key = f"dice_{k}click"
        result[key] = sum(r[key] for r in positives) / max(len(positives), 1) if positives and key in rows[0] else None
    return result


def recipe_with_seed(seed: int) -> list[str]:
    """RECIPE with its ``--seed`` value replaced."""
    recipe = list(RECIPE)
    recipe[recipe.index("--seed") + 1] = str(seed)
    return recipe


def bench_cohort(name: str, spec: CohortSpec, work: Path, extra_flags: list[str], unet_budget_s: str,
                 python: str, seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Generate (once), train and score one cohort for every training seed; the U-Net gets the first seed's time."""
    data = work / "cohorts" / name
    if not (data / "val.csv").is_file():
        logger.info("%s: generating %d + %d scans", name, spec.n_train, spec.n_val)
        generate_cohort(data, spec.n_train, spec.n_val, shape=spec.shape, spacing=spec.spacing, seed=spec.seed,
                        min_ml=spec.min_ml, max_ml=spec.max_ml, appearance=spec.appearance)
    files = ["--train_csv", str(data / "train.csv"), "--val_csv", str(data / "val.csv"), "--mask_dir",
             str(data / "masks")]
    variant = f"{name}{'-' + '-'.join(f.strip('-') for f in extra_flags) if extra_flags else ''}"
    runs = []
    for seed in seeds:
        run_dir = work / "runs" / (variant if seed == 0 else f"{variant}-seed{seed}")
        train_command = [python, "train.py", *files, *recipe_with_seed(seed), *extra_flags, "--output_dir",
                         str(run_dir), "--overwrite", "--cache_dir", str(work / "cache")]
        logger.info("%s: %s", name, shlex.join(train_command))
        train_s = _run(train_command, work / f"{run_dir.name}.train.log")
        latest = json.loads(sorted(run_dir.glob("training_summary_*.json"))[-1].read_text())
        first_good = next((h["epoch"] for h in latest["history"] if (h.get("val_dice") or 0) > 0.5), None)
        predict_command = [python, "predict.py", "--checkpoint", str(run_dir / "best_model.pth"), "--input",
                           str(data / "val.csv"), "--mask_dir", str(data / "masks"), "--output_dir",
                           str(run_dir / "val_predictions"), "--device", "cpu"]
        _run(predict_command, work / f"{run_dir.name}.predict.log")
        # Which part segments: the SAM decoder's own answer read alone (bench/decoder_probe.py).
        probe_command = [python, "bench/decoder_probe.py", "--run_dir", str(run_dir), "--input",
                         str(data / "val.csv"), "--mask_dir", str(data / "masks"), "--device", "cpu", "--out",
                         str(run_dir / "decoder_probe.md"), "--json", str(run_dir / "decoder_probe.json")]
        _run(probe_command, work / f"{run_dir.name}.decoder_probe.log")
        probe = json.loads((run_dir / "decoder_probe.json").read_text())
        ours = {"seed": seed, "train_s": train_s, "first_epoch_dice_over_0.5": first_good,
                "epochs": len(latest["history"]),
                **_scores(_read_rows(run_dir / "val_predictions" / "metrics.csv"), (1, 3, 5)),
                "decoder_dice": probe["decoder_dice_positive"]}
        logger.info("%s: ichseg %s", name, ours)
        runs.append(ours)
    result: dict[str, Any] = {"cohort": name, "description": spec.description, "ours": runs[0], "seeds": runs}
    budget = runs[0]["train_s"] if unet_budget_s == "match" else float(unet_budget_s)
    if budget > 0:
        unet = train_unet(files[1], files[3], files[5], work / "runs" / f"{name}-unet", budget)
        result["unet"] = {"train_s": unet["train_s"], "steps": unet["steps"], **_scores(unet["rows"], ())}
        logger.info("%s: U-Net %s", name, result["unet"])
    return result


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean, or None when any value is missing (runs from before the decoder probe)."""
    values = list(values)
    return None if any(v is None for v in values) else _mean(values)


def _decoder_cell(dice: float | None) -> str:
    return "–" if dice is None else format_number(dice)


def _pooled(fractions: Iterable[str]) -> str:
    """'a/b' strings summed: '3/4', '4/4' -> '7/8'."""
    pairs = [tuple(int(n) for n in f.split("/")) for f in fractions]
    return f"{sum(p[0] for p in pairs)}/{sum(p[1] for p in pairs)}"


def markdown(results: list[dict[str, Any]], command: str, label: str) -> str:
    lines = [f"# Learning benchmark{f' — {label}' if label else ''}", "",
             f"Command: `{command}`  ",
             f"Recipe (train.py): `{shlex.join(RECIPE)}`"
             + (" with `--seed` as in the row" if any(len(r.get("seeds", ())) > 1 for r in results) else "") + "  ",
             f"Machine: {os.cpu_count()} CPU cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; "
             "scores on the validation scans in their original grid (predict.py / the U-Net scored the same way).", "",
             "| cohort | model | train time | Dice (positives) | 1 / 3 / 5 clicks | negatives empty | FP mL "
             "(negatives) | mean abs volume error mL | first epoch Dice > 0.5 | decoder alone: Dice (positives) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        runs = r.get("seeds", [r["ours"]])
        for o in runs:
            clicks = " / ".join(format_number(o[f"dice_{k}click"]) for k in (1, 3, 5))
            model = "ichseg tiny" + (f", seed {o['seed']}" if len(runs) > 1 else "")
            lines.append(f"| {r['cohort']} | {model} | {o['train_s']:.0f} s ({o['epochs']} ep) | "
                         f"{format_number(o['dice'])} | {clicks} | {o['negatives_empty']} | "
                         f"{format_number(o['fp_ml'], 2)} | {format_number(o['volume_error_ml'], 2)} | "
                         f"{o['first_epoch_dice_over_0.5'] or 'never'} | {_decoder_cell(o.get('decoder_dice'))} |")
        if len(runs) > 1:
            lines.append(f"| {r['cohort']} | ichseg tiny, {len(runs)} seeds | max {max(o['train_s'] for o in runs):.0f} s "
                         f"| mean {format_number(_mean(o['dice'] for o in runs))}, min "
                         f"{format_number(min(o['dice'] for o in runs))} | mean "
                         + " / ".join(format_number(_mean(o[f'dice_{k}click'] for o in runs)) for k in (1, 3, 5))
                         + f" | {_pooled(o['negatives_empty'] for o in runs)} | "
                         f"{format_number(_mean(o['fp_ml'] for o in runs), 2)} | "
                         f"{format_number(_mean(o['volume_error_ml'] for o in runs), 2)} | – | "
                         f"{_decoder_cell(_mean_or_none(o.get('decoder_dice') for o in runs))} |")
        if "unet" in r:
            u = r["unet"]
            lines.append(f"| {r['cohort']} | MONAI U-Net | {u['train_s']:.0f} s ({u['steps']} steps) | "
                         f"{format_number(u['dice'])} | – | {u['negatives_empty']} | {format_number(u['fp_ml'], 2)} | "
                         f"{format_number(u['volume_error_ml'], 2)} | – | – |")
    lines += ["", "Cohorts:"] + [f"- **{r['cohort']}**: {r['description']}" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS))
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/ichseg_learning_bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learning_bench")
    parser.add_argument("--extra_flags", default="", help="appended to the recipe, e.g. '--no-mask_refiner'")
    parser.add_argument("--label", default="", help="names a variant in the table title")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds (the recipe's --seed); with several, each cohort gets a row per seed "
                             "and their mean: one seed can move a 6-positive cohort's Dice by 0.15")
    parser.add_argument("--unet_budget_s", default="match",
                        help="the U-Net's training budget in seconds: 'match' (default) gives it the wall time ichseg's "
                             "training took on that cohort, 300 is the learning anchors' budget, 0 skips it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = [bench_cohort(name, COHORTS[name], args.work_dir, shlex.split(args.extra_flags), args.unet_budget_s,
                            sys.executable, tuple(args.seeds)) for name in args.cohorts]
    command = shlex.join(["python", "bench/learning_bench.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(args.out.with_suffix(".md"), markdown(results, command, args.label))
    utils.atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=2, default=str) + "\n")
    logger.info("wrote %s", args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
