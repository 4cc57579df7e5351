"""False-positive mining (mining.py): which voxels count as the model's false positives, when a pass runs, that
the trainer hands its result to the loader and keeps it across a resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracking
from config import build_config
from distributed import RankGroup
from mining import FalsePositiveMining, false_positive_voxels
from model import build_model
from trainer import Trainer

SHAPE = (24, 24, 24)


class Thresholder(nn.Module):
    """A stand-in segmenter: blood wherever the image is above 0.5 (logit ±4)."""

    img_size = 16

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"masks": torch.where(image > 0.5, 4.0, -4.0)}


def scan_with_a_bleed_and_a_look_alike() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A bright labelled bleed, a bright unlabelled streak, a one-voxel rim just outside the bleed (its margin)."""
    image = torch.zeros(1, 1, *SHAPE)
    label = torch.zeros(1, 1, *SHAPE)
    label[..., 4:9, 4:9, 4:9] = 1
    image[..., 4:10, 4:9, 4:9] = 1.0          # the bleed plus one over-segmented slice next to it
    streak = np.zeros(SHAPE, dtype=bool)
    streak[15:18, 2:22, 18:20] = True
    image[0, 0][torch.from_numpy(streak)] = 1.0
    return image, label, streak


def test_false_positives_are_the_predicted_voxels_away_from_the_label():
    image, label, streak = scan_with_a_bleed_and_a_look_alike()
    mined = false_positive_voxels(Thresholder(), image, label, 16, None, (1.5, 1.5, 1.5))
    assert mined.dtype == np.int32 and np.all(np.diff(mined) > 0)
    assert set(mined.tolist()) == set(np.flatnonzero(streak).tolist())   # not the bleed's own rim
    # At most max_voxels, spread over the whole look-alike rather than its first rows.
    thinned = false_positive_voxels(Thresholder(), image, label, 16, None, (1.5, 1.5, 1.5), max_voxels=10)
    assert 5 <= thinned.size <= 10 and set(thinned.tolist()) <= set(mined.tolist())
    assert np.unravel_index(thinned, SHAPE)[1].max() > 15
    # Components validation would drop (here: under 1 mL at 1.5 mm, the streak is 0.4 mL) are not mined.
    assert false_positive_voxels(Thresholder(), image, label, 16, None, (1.5, 1.5, 1.5), min_component_ml=1.0).size == 0
    # A negative scan: everything predicted is a false positive.
    empty = false_positive_voxels(Thresholder(), image, torch.zeros_like(label), 16, None, (1.5, 1.5, 1.5))
    assert empty.size == int((image > 0.5).sum())


def test_mining_runs_every_n_epochs_once_and_keeps_its_result_as_plain_data(tmp_path):
    image, label, streak = scan_with_a_bleed_and_a_look_alike()
    scans = [{"image": image[0].numpy(), "label": label[0].numpy().astype(np.uint8)},
             {"image": np.zeros((1, *SHAPE), np.float32), "label": np.zeros((1, *SHAPE), np.uint8)}]
    mining = FalsePositiveMining(25, scans, 16, (1.5, 1.5, 1.5), RankGroup(1, torch.device("cpu")))
    assert [e for e in range(100) if mining.due(e)] == [25, 50, 75]
    model = Thresholder().train()
    assert mining.before_epoch(24, model, torch.device("cpu")) == {}   # nothing mined yet
    found = mining.before_epoch(25, model, torch.device("cpu"))
    assert model.training                        # back in training mode
    assert list(found) == [0] and found[0].size == streak.sum()   # the clean scan has nothing to mine
    assert not mining.due(25) and mining.due(50)  # a run resumed within epoch 25 does not mine again
    assert mining.before_epoch(26, Thresholder(), torch.device("cpu")) is found   # kept until the next pass
    # The ETA counts the passes still due (epochs 50 and 75) at the last one's duration.
    assert mining.pass_seconds > 0 and mining.seconds_left(26, 100) == pytest.approx(2 * mining.pass_seconds)
    assert mining.seconds_left(76, 100) == 0
    torch.save(mining.state_dict(), tmp_path / "state.pth")
    restored = FalsePositiveMining(25, scans, 16, (1.5, 1.5, 1.5))
    restored.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=True))
    assert restored.mined_at == 25 and list(restored.indices) == [0]
    assert np.array_equal(restored.indices[0], found[0]) and restored.indices[0].dtype == np.int32
    with pytest.raises(ValueError, match="mining interval"):
        FalsePositiveMining(0, scans, 16, (1.5, 1.5, 1.5))


class ScanLoader:
    """A loader stand-in with the cached scans behind it (``dataset.base``) and fixed training batches."""

    def __init__(self, scans, batches):
        self.dataset = type("Stage", (), {"base": scans})()
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_the_trainer_mines_when_due_and_hands_the_voxels_to_the_loader(tmp_path, caplog):
    image, label, _ = scan_with_a_bleed_and_a_look_alike()
    scans = [{"image": np.pad(image[0].numpy(), ((0, 0), (0, 40), (0, 40), (0, 40))),
              "label": np.pad(label[0].numpy(), ((0, 0), (0, 40), (0, 40), (0, 40))).astype(np.uint8)}]
    batch = {"image": torch.randn(1, 1, 64, 64, 64), "label": torch.zeros(1, 1, 64, 64, 64),
             "ich": torch.zeros(1), "case_id": ["s0"]}
    config, _ = build_config(["--test", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path),
                              "--epochs", "3", "--false_positive_crop_fraction", "0.5",
                              "--false_positive_mining_every", "2", "--target_spacing", "1.5", "1.5", "1.5"])
    calls = []
    trainer = Trainer(config, build_model(config.model), ScanLoader(scans, [batch]), ScanLoader([], []),
                      torch.device("cpu"), tracking.NullTracker(), tmp_path,
                      set_loader_epoch=lambda loader, epoch, **kw: calls.append((epoch, kw)))
    trainer.model.forward = lambda window, **_: {"masks": torch.where(window > 0.5, 4.0, -4.0)}
    for epoch in range(3):
        trainer.on_epoch_start(epoch)
    assert [epoch for epoch, _ in calls] == [0, 1, 2]
    assert calls[0][1]["mined"] == {} and calls[1][1]["mined"] == {}
    assert list(calls[2][1]["mined"]) == [0] and calls[2][1]["mined"][0].size > 0
    assert trainer.checkpoint_state()["false_positive_mining"]["mined_at"] == 2
    # Without the flag nothing is mined and the loader gets no mined voxels.
    config, _ = build_config(["--test", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path / "b")])
    plain = Trainer(config, build_model(config.model), ScanLoader(scans, [batch]), ScanLoader([], []),
                    torch.device("cpu"), tracking.NullTracker(), tmp_path / "b",
                    set_loader_epoch=lambda loader, epoch, **kw: calls.append((epoch, kw)))
    plain.on_epoch_start(0)
    assert plain.mining is None and "mined" not in calls[-1][1]
    # A loader without cached scans behind it (nothing to mine) turns mining off, and says so.
    config, _ = build_config(["--test", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path / "c"),
                              "--false_positive_crop_fraction", "0.5"])
    blind = Trainer(config, build_model(config.model), [batch], ScanLoader([], []), torch.device("cpu"),
                    tracking.NullTracker(), tmp_path / "c")
    assert blind.mining is None and "no cached scans to mine" in caplog.text



def test_each_rank_mines_its_share_of_the_scans_and_all_get_every_result():
    image, label, _ = scan_with_a_bleed_and_a_look_alike()
    scan = {"image": image[0].numpy(), "label": label[0].numpy().astype(np.uint8)}

    class Scans(list):
        read: list[int] = []

        def __getitem__(self, index):
            self.read.append(index)
            return super().__getitem__(index)

    class OtherRankFoundScan3:
        world_size = 2

        def gather(self, values):
            return values + [(3, np.array([7], dtype=np.int32))]

    scans = Scans([scan] * 5)
    mining = FalsePositiveMining(1, scans, 16, (1.5, 1.5, 1.5), OtherRankFoundScan3(), rank=0)
    found = mining.before_epoch(1, Thresholder(), torch.device("cpu"))
    assert scans.read == [0, 2, 4]
    assert sorted(found) == [0, 2, 3, 4] and found[3].tolist() == [7]
