"""bench/decoder_probe.py reads the decoder's own answer and the refined one apart, on the model's grid."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from test_predict import untrained_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decoder_probe  # noqa: E402

SPACING = (3.0, 3.0, 3.0)  # the untrained checkpoint's target spacing: the model grid is the scan's grid


def _scan(tmp_path: Path) -> tuple[Path, Path]:
    image = np.full((40, 40, 12), -1000, dtype=np.int16)
    image[5:35, 5:35, 2:10] = 35                     # brain
    image[10:16, 10:16, 4:8] = 70                    # blood
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[10:16, 10:16, 4:8] = 1
    scan = tmp_path / "scans" / "007.pkl"
    scan.parent.mkdir()
    scan.write_bytes(pickle.dumps({"image": image, "spacing": SPACING}))
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask, np.diag([*SPACING, 1.0])), tmp_path / "masks" / "007.nii.gz")
    return scan, tmp_path / "masks" / "007.nii.gz"


def test_decoder_and_refined_answers_are_scored_apart(tmp_path):
    scan, mask = _scan(tmp_path)
    checkpoint = untrained_tiny_checkpoint(tmp_path / "best_model.pth")
    # The refiner's last layer starts at zero (refined == decoder); a large bias makes it call every voxel blood,
    # so only the refined column may change.
    state = torch.load(checkpoint, weights_only=True)
    state["model_state_dict"]["refiner.unfold.bias"] = torch.tensor([30.0])
    torch.save(state, tmp_path / "biased.pth")
    plain = decoder_probe.probe_scan(decoder_probe.Predictor(checkpoint, torch.device("cpu")), scan, mask)
    predictor = decoder_probe.Predictor(tmp_path / "biased.pth", torch.device("cpu"))
    biased = decoder_probe.probe_scan(predictor, scan, mask)
    assert plain["coarse_masks"] == plain["masks"]          # an untrained refiner is the identity
    assert biased["coarse_masks"] == plain["coarse_masks"]  # the decoder's answer does not see the refiner
    voxels, blood = 40 * 40 * 12, 6 * 6 * 4
    assert biased["masks"]["ml"] == voxels * 27 / 1000       # every voxel of the 3 mm grid
    assert abs(biased["masks"]["dice"] - 2 * blood / (voxels + blood)) < 1e-6
    assert biased["masks"]["bleed"] == biased["masks"]["head"] == "1.00 / 1.00 / 1.00"


def test_markdown_table_has_a_row_per_scan(tmp_path):
    scan, _ = _scan(tmp_path)
    (tmp_path / "run").mkdir()
    untrained_tiny_checkpoint(tmp_path / "run" / "best_model.pth")
    out = tmp_path / "probe.md"
    assert decoder_probe.main(["--run_dir", str(tmp_path / "run"), "--input", str(scan.parent), "--mask_dir",
                               str(tmp_path / "masks"), "--out", str(out), "--device", "cpu"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 007.pkl |")]
    assert len(rows) == 1 and rows[0].count("|") == 10


def test_json_means_count_ich_positive_scans_only(tmp_path):
    scan, mask = _scan(tmp_path)
    empty = tmp_path / "scans" / "008.pkl"
    empty.write_bytes(scan.read_bytes())             # no mask: an ICH-negative scan
    (tmp_path / "run").mkdir()
    checkpoint = untrained_tiny_checkpoint(tmp_path / "run" / "best_model.pth")
    state = torch.load(checkpoint, weights_only=True)
    state["model_state_dict"]["refiner.unfold.bias"] = torch.tensor([30.0])
    torch.save(state, checkpoint)
    out = tmp_path / "probe.json"
    assert decoder_probe.main(["--run_dir", str(tmp_path / "run"), "--input", str(scan.parent), "--mask_dir",
                               str(tmp_path / "masks"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["scans"]) == {"007.pkl", "008.pkl"}
    assert summary["scans"]["007.pkl"]["masks"]["positive"] and not summary["scans"]["008.pkl"]["masks"]["positive"]
    # The refined answer is all blood: 0 on the negative scan, which must not enter the mean.
    assert summary["refined_dice_positive"] == summary["scans"]["007.pkl"]["masks"]["dice"] > 0
    assert summary["decoder_dice_positive"] == summary["scans"]["007.pkl"]["coarse_masks"]["dice"]


def test_an_unavailable_device_is_a_usage_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scan, _ = _scan(tmp_path)
    with pytest.raises(SystemExit) as caught:
        decoder_probe.main(["--run_dir", str(tmp_path), "--input", str(scan.parent), "--mask_dir",
                            str(tmp_path / "masks"), "--device", "cuda"])
    assert caught.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_a_run_without_a_checkpoint_is_a_usage_error_naming_it(tmp_path, capsys):
    scan, _ = _scan(tmp_path)
    with pytest.raises(SystemExit) as caught:
        decoder_probe.main(["--run_dir", str(tmp_path / "nowhere"), "--input", str(scan.parent), "--mask_dir",
                            str(tmp_path / "masks"), "--device", "cpu"])
    assert caught.value.code == 2 and str(tmp_path / "nowhere" / "best_model.pth") in capsys.readouterr().err
