"""sam_encoder.pth from a real training run is a drop-in BLIP-2 visual encoder (issue 6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import blip2
from dataloader import load_image_file
from model import load_representation_head, load_sam_encoder


@pytest.fixture(scope="module")
def export(trained_run):
    path = trained_run["output_dir"] / "sam_encoder.pth"
    return path, torch.load(path, map_location="cpu", weights_only=True)


def test_export_holds_everything_needed_as_plain_data(export):
    _, payload = export
    for key in ("image_encoder_state_dict", "representation_head_state_dict", "encoder_config", "preprocessing",
                "visual_tokens", "num_features", "format_version", "provenance"):
        assert key in payload, key
    assert payload["encoder_config"]["img_size"] == 64
    assert not any(k.startswith(("module.", "image_encoder.")) for k in payload["image_encoder_state_dict"])
    assert set(payload["preprocessing"]) >= {"hu_window", "normalization", "target_spacing", "input_size"}
    assert payload["provenance"]["epoch"] >= 1 and 0 <= payload["provenance"]["val_dice"] <= 1
    assert payload["provenance"]["config"]["model"]["name"] == "tiny"


def test_rebuilt_encoder_gives_bit_identical_tokens(trained_run):
    out = trained_run["output_dir"]
    detail = blip2.check_encoder_export(out / "sam_encoder.pth", out / "best_model.pth")
    assert "bit-identical" in detail


def test_the_one_line_load_works_on_a_fresh_visual_encoder(export):
    path, payload = export
    visual_encoder = load_sam_encoder(path)
    for tensor in visual_encoder.parameters():
        torch.nn.init.zeros_(tensor)  # a BLIP-2 model's freshly built encoder
    visual_encoder.load_state_dict(torch.load(path, weights_only=True)["image_encoder_state_dict"])
    assert not visual_encoder.training
    assert visual_encoder.num_features == payload["num_features"]
    tokens = visual_encoder(torch.zeros(2, 1, 64, 64, 64))
    assert tokens.shape == (2, 512, payload["num_features"])
    head = load_representation_head(path)
    out = head(tokens)
    assert out["tokens"].shape == (2, 512, payload["visual_tokens"]) and out["ich_logit"].shape == (2,)


def test_tokens_feed_a_real_qformer_with_gradients_into_the_encoder(export):
    pytest.importorskip("transformers")
    path, _ = export
    assert "gradients reach all" in blip2.check_qformer(path)


def test_raw_ct_is_prepared_with_the_saved_preprocessing(trained_run, export):
    _, payload = export
    scan = trained_run["cohort"].root / "images" / "001.pkl"
    volume, meta = load_image_file(scan)
    spacing = meta["spacing"] or (1.2, 1.2, 4.0)
    prepared = blip2.prepare_encoder_input(volume, spacing, payload["preprocessing"])
    assert prepared.shape == (1, 1, 64, 64, 64) and prepared.dtype == torch.float32
    assert torch.isfinite(prepared).all()
    # z-scored inside the head, and the padding is air (the minimum), as in training crops.
    assert prepared.min() < -1 and prepared[0, 0, 0, 0, 0] == prepared.min()
    big = np.random.default_rng(0).normal(40.0, 10.0, size=(200, 10, 10)).astype(np.float32)
    big[0] = -1000.0  # a long, thin scan: cropped along axis 0, padded along the others
    assert blip2.prepare_encoder_input(big, (2.0, 2.0, 2.0), payload["preprocessing"]).shape == (1, 1, 64, 64, 64)
