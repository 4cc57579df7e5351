"""Ensembles in predict.py: which checkpoints --checkpoint names, the mean of the members' probabilities, and the
refusal of members trained with different preprocessing."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import ensemble
import predict
import trainer
from dataloader import load_image_file
from inference import Click


def test_checkpoint_files_run_folders_and_fold_folders(tmp_path):
    assert ensemble.BEST_CHECKPOINT == trainer.BEST_NAME
    single = tmp_path / "one.pth"
    single.write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pth").write_bytes(b"")
    cv = tmp_path / "cv"
    for k in (1, 0, 10, 2):
        (cv / f"fold_{k}").mkdir(parents=True)
        (cv / f"fold_{k}" / "best_model.pth").write_bytes(b"")
    (cv / "cache").mkdir()
    assert ensemble.resolve_checkpoints([str(single), str(run), str(cv)]) == [
        single, run / "best_model.pth", *(cv / f"fold_{k}" / "best_model.pth" for k in (0, 1, 2, 10))]

    (cv / "fold_2" / "best_model.pth").unlink()
    with pytest.raises(ensemble.EnsembleError) as caught:
        ensemble.resolve_checkpoints([str(cv), str(tmp_path / "nope.pth"), str(single), str(single),
                                      str(tmp_path / "run" / ".." / "one.pth")])
    message = str(caught.value)
    assert "fold_2/best_model.pth" in message and "--resume auto" in message
    assert "nope.pth: no such checkpoint file or folder" in message
    assert message.count("given more than once") == 2


@pytest.fixture(scope="module")
def positive_scan(trained_run):
    with open(trained_run["cohort"].val_csv, newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["ich"] == "1")
    image, meta = load_image_file(row["path"])
    return image, meta["spacing"] or (1.2, 1.2, 4.0)


def test_an_ensemble_averages_its_members_probabilities(trained_run, positive_scan):
    image, spacing = positive_scan
    cpu = torch.device("cpu")
    paths = [trained_run["output_dir"] / "best_model.pth", trained_run["output_dir"] / "latest_model.pth"]
    members = [predict.Predictor(p, cpu) for p in paths]
    both = predict.Predictor(paths, cpu)
    assert len(both.models) == 2 and both.preprocessing == members[0].preprocessing
    click = [Click(tuple(float(s // 2) for s in image.shape), True)]
    for clicks in ([], click):
        expected = np.mean([m.segment(image, spacing, clicks)[0] for m in members], axis=0)
        averaged, simulated = both.segment(image, spacing, clicks, truth=np.zeros(image.shape, np.uint8),
                                           simulate=(1,))
        np.testing.assert_allclose(averaged, expected, atol=1e-5)
        assert simulated == {}   # simulated clicks are a single model's measure


def test_members_trained_with_other_preprocessing_are_refused(trained_run, tmp_path, caplog):
    best = trained_run["output_dir"] / "best_model.pth"
    state = torch.load(best, map_location="cpu", weights_only=True)
    state["preprocessing"]["target_spacing"] = [3.0, 3.0, 3.0]
    other = tmp_path / "other_spacing.pth"
    torch.save(state, other)
    with open(trained_run["cohort"].val_csv, newline="") as handle:
        scan = next(csv.DictReader(handle))["path"]
    assert predict.main(["--checkpoint", str(best), str(other), "--input", scan, "--output_dir",
                         str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "trained with different preprocessing" in caplog.text
    assert "other_spacing.pth" in caplog.text and "best_model.pth" in caplog.text
