"""Cross-validation through the real CLIs: splits -> train.py --fold all (killed mid-fold, resumed) -> CV summary
-> predict.py ensembling the folds into a test report with confidence intervals."""
from __future__ import annotations

import csv
import json
import math
import signal

import pytest

import crossval
import predict
import splits
import train
from synthetic import generate_cohort
from trainer import Trainer

TINY = ["--model", "tiny", "--epochs", "2", "--max_steps_per_epoch", "2", "--num_workers", "0", "--device", "cpu",
        "--target_spacing", "4", "4", "4", "--val_every", "1", "--batch_size", "2",
        "--gradient_accumulation_steps", "1", "--seed", "5", "--scheduler_type", "cosine", "--warmup_epochs", "0",
        "--patience", "2"]


@pytest.fixture(scope="module")
def cohort_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    cohort = generate_cohort(root / "data", n_train=10, n_val=4, shape=(48, 48, 12), spacing=(2.0, 2.0, 5.0), seed=1)
    assert splits.main(["--csv", str(cohort.train_csv), str(cohort.val_csv), "--mask_dir", str(cohort.mask_dir),
                        "--out_dir", str(root / "splits"), "--folds", "2", "--test_fraction", "0.25"]) == 0
    return {"root": root, "cohort": cohort, "splits": root / "splits"}


@pytest.fixture(scope="module")
def cv_run(cohort_splits):
    """--fold all, killed by SIGTERM in fold 1 after its first optimiser step, then continued with --resume auto."""
    out = cohort_splits["root"] / "run"
    argv = ["--folds_dir", str(cohort_splits["splits"]), "--mask_dir", str(cohort_splits["cohort"].mask_dir),
            "--output_dir", str(out), "--fold", "all", *TINY]
    real_step = Trainer._optimizer_step

    def step_then_signal(self):
        real_step(self)
        if self.output_dir.name == "fold_1" and self.global_step == 1:
            self._stop_signal = signal.SIGTERM

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_optimizer_step", step_then_signal)
        killed = train.main(argv)
    after_kill = json.loads((out / "cv_summary.json").read_text())
    fold0_summaries = sorted(p.name for p in (out / "fold_0").glob("training_summary_*.json"))
    resumed = train.main(argv + ["--resume", "auto"])
    return {"out": out, "killed": killed, "after_kill": after_kill, "fold0_summaries": fold0_summaries,
            "resumed": resumed, **cohort_splits}


def test_fold_all_trains_every_fold_and_a_killed_fold_resumes_there(cv_run):
    out = cv_run["out"]
    assert cv_run["killed"] == 130 and cv_run["resumed"] == 0
    assert cv_run["after_kill"]["finished_folds"] == [0] and cv_run["after_kill"]["missing_folds"] == [1]
    # Fold 0 was not trained again; fold 1 continued from its own latest_model.pth.
    assert sorted(p.name for p in (out / "fold_0").glob("training_summary_*.json")) == cv_run["fold0_summaries"]
    cv_log = (out / "cv.log").read_text()
    assert "fold 0 already finished" in cv_log and "fold 1 stopped with exit code 130" in cv_log
    assert "resumed from" in (out / "fold_1" / "train.log").read_text()
    for k in (0, 1):
        config = json.loads((out / f"fold_{k}" / "config.json").read_text())
        assert config["data"]["train_csv"] == str(cv_run["splits"] / f"fold_{k}" / "train.csv")
        assert config["data"]["cache_dir"] == str(out / "cache") and config["train"]["fold"] == str(k)
        assert (out / f"fold_{k}" / "best_model.pth").is_file()


def test_cv_summary_has_every_fold_and_mean_sd(cv_run):
    out = cv_run["out"]
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["complete"] and [r["fold"] for r in summary["per_fold"]] == [0, 1]
    for key, _ in crossval.CV_METRICS:
        values = [r[key] for r in summary["per_fold"] if r[key] is not None]
        stats = summary["mean_sd"][key]
        if len(values) == 2:
            assert stats["mean"] == pytest.approx(sum(values) / 2)
            assert stats["sd"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    best = [json.loads(sorted((out / f"fold_{k}").glob("training_summary_*.json"))[-1].read_text())["best_metrics"]
            for k in (0, 1)]
    # Every column is the trainer's own best-epoch number (a renamed key would otherwise show up as n/a).
    for row, metrics in zip(summary["per_fold"], best):
        for key, _ in crossval.CV_METRICS:
            assert key in metrics, key
            assert row[key] == pytest.approx(metrics[key], nan_ok=True), key
    table = (out / "cv_summary.md").read_text()
    assert "| mean ± sd |" in table and "Dice 1 click" in table and "sensitivity" in table
    with open(out / "cv_summary.csv", newline="") as handle:
        assert [r["fold"] for r in csv.DictReader(handle)] == ["0", "1", "mean", "sd"]


def test_predict_ensembles_the_folds_into_a_test_report(cv_run, tmp_path, caplog):
    report_dir = tmp_path / "test_report"
    assert predict.main(["--checkpoint", str(cv_run["out"]), "--input", str(cv_run["splits"] / "test.csv"),
                         "--mask_dir", str(cv_run["cohort"].mask_dir), "--output_dir", str(report_dir),
                         "--device", "cpu"]) == 0
    assert "fold_0/best_model.pth, " in caplog.text and "ensemble of 2 models" in caplog.text
    text = (report_dir / "report.md").read_text()
    assert "ensemble of 2 checkpoints" in text and "| Dice | ICH+ |" in text and "95% CI" in text
    assert "ICC(2,1)" in text and "![Volume agreement](volume_agreement.png)" in text
    numbers = json.loads((report_dir / "report.json").read_text())
    low, high = numbers["summary_ci"]["dice"]
    assert low <= numbers["summary"]["dice"] <= high
    assert numbers["counts"]["all"] == len(list(csv.DictReader(open(cv_run["splits"] / "test.csv"))))
    for name in ("volume_agreement.png", "dice_by_volume.png", "metrics.csv"):
        assert (report_dir / name).stat().st_size > 0


def test_fold_flags_that_cannot_work_exit_2(cohort_splits, tmp_path, capsys, caplog):
    base = ["--mask_dir", str(cohort_splits["cohort"].mask_dir), "--output_dir", str(tmp_path / "run"), *TINY]
    folds = ["--folds_dir", str(cohort_splits["splits"])]
    assert train.main(folds + base + ["--train_csv", str(cohort_splits["cohort"].train_csv)]) == 2
    assert "--train_csv and --folds_dir exclude each other" in capsys.readouterr().err
    assert train.main(folds + base + ["--fold", "first"]) == 2
    assert "--fold must be 'all' or a fold number" in capsys.readouterr().err
    assert train.main(base + ["--fold", "1", "--train_csv", "x.csv", "--val_csv", "y.csv"]) == 2
    assert "--fold 1 needs --folds_dir" in capsys.readouterr().err
    assert train.main(folds + base + ["--fold", "7"]) == 2
    assert "--fold 7" in caplog.text and "has folds 0, 1" in caplog.text


def test_mean_sd_leave_undefined_folds_out_and_the_table_says_n_a():
    nan = math.nan
    rows = [{"fold": k, "best_epoch": 1, **{key: nan for key, _ in crossval.CV_METRICS}} for k in range(3)]
    for row, dice, hd95, specificity in zip(rows, (0.5, 0.6, 0.7), (10.0, nan, 14.0), (nan, nan, nan)):
        row.update(val_dice=dice, val_hd95_mm=hd95, val_specificity=specificity)
    stats = crossval.summarize_folds(rows)
    assert stats["val_dice"] == {"mean": pytest.approx(0.6), "sd": pytest.approx(0.1), "n": 3}
    assert stats["val_hd95_mm"] == {"mean": pytest.approx(12.0), "sd": pytest.approx(math.sqrt(8)), "n": 2}
    assert math.isnan(stats["val_specificity"]["mean"]) and stats["val_specificity"]["n"] == 0
    table = crossval.format_cv_table(rows, stats).splitlines()
    assert len(table) == 2 + 3 + 1 and table[-1].startswith("| mean ± sd |  | 0.600 ± 0.100 |")
    assert "| 12.000 ± 2.828 |" in table[-1] and "| n/a ± n/a |" in table[-1]
    one = crossval.summarize_folds(rows[:1])
    assert one["val_dice"]["mean"] == pytest.approx(0.5) and math.isnan(one["val_dice"]["sd"])


def test_a_fold_is_finished_at_its_epochs_or_after_early_stopping(tmp_path):
    config = train.build_config(["--folds_dir", str(tmp_path), "--mask_dir", str(tmp_path), *TINY])[0]
    assert not crossval.is_finished(None, config)
    assert not crossval.is_finished({"stop_reason": "max_epochs", "epochs_completed": 1}, config)
    assert crossval.is_finished({"stop_reason": "max_epochs", "epochs_completed": 2}, config)
    assert crossval.is_finished({"stop_reason": "early_stopping", "epochs_completed": 1}, config)
    for name in ("training_summary_20240101-120000.json", "training_summary_20240101-120000-2.json",
                 "training_summary_20231231-235959-9.json"):
        (tmp_path / name).write_text(json.dumps({"name": name}))
    assert crossval.latest_summary(tmp_path) == {"name": "training_summary_20240101-120000-2.json"}
