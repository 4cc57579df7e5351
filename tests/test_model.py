"""SAM-Med3D model: published layout, loading, attention numerics, precision, validation, export, learning."""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model as model_module
from config import Config, ModelConfig
from model import (TURBO_CHECKPOINT_URL, CheckpointError, CheckpointMismatchError, CheckpointNotFoundError,
                   CheckpointUnavailableError, build_model, build_sam_med3d_turbo, build_tiny, export_encoder,
                   load_pretrained, load_representation_head, load_sam_encoder, load_trained, resolve_checkpoint,
                   trainable_parameters)
from modeling.common import upsample_trilinear
from modeling.image_encoder import EncoderBlock, ImageEncoderViT3D
from modeling.refiner import MaskRefiner3D
from modeling.representation_head import RepresentationHead

# A copy of ../shared/reference/sam_med3d_turbo_state_dict.tsv (facts: names and shapes), kept in the repo so the
# strict-loading tests never skip.
TSV = Path(__file__).resolve().parent / "data" / "sam_med3d_turbo_state_dict.tsv"
# Totals of the published file (reference README): whole state dict and per part.
TURBO_TOTAL = 100_509_616
TURBO_PARTS = {"image_encoder": 92_924_928, "prompt_encoder": 9_052, "mask_decoder": 7_575_636}
S = 64  # tiny input side


# ----------------------------------------------------------------------------------------------------- helpers

def published_layout() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the published checkpoint, in file order, read from the reference TSV."""
    shapes = {}
    for line in TSV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, _dtype = line.split("\t")
            shapes[key] = tuple(int(s) for s in shape.split("x"))
    return shapes


def tiny_model(seed: int = 0, visual_tokens: int = 32, refiner: bool = False) -> torch.nn.Module:
    """A tiny model with non-trivial relative-position tables and qkv biases (zero-initialised upstream), so that
    the padded-window keys and the rel-pos bias really influence the numbers the tests compare. Without the mask
    refiner unless asked: most tests here are about SAM-Med3D's own parts."""
    torch.manual_seed(seed)
    model = build_tiny(visual_tokens=visual_tokens, refiner=refiner)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            for table in (block.attn.rel_pos_d, block.attn.rel_pos_h, block.attn.rel_pos_w):
                table.normal_(0.0, 0.5)
            block.attn.qkv.bias.normal_(0.0, 0.5)
        model.image_encoder.pos_embed.normal_(0.0, 0.1)
    return model


def volume(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, S, S, S, generator=torch.Generator().manual_seed(seed))


def clicks(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.tensor([[[10.0, 20.0, 30.0], [40.0, 5.0, 63.0]]] * batch)
    labels = torch.tensor([[1, 0]] * batch)
    return points, labels


def save_own_checkpoint(model: torch.nn.Module, path: Path, state_dict: dict | None = None) -> Path:
    """The layout the trainer writes (best_model.pth / latest_model.pth)."""
    torch.save({"model_state_dict": state_dict if state_dict is not None else model.state_dict(),
                "optimizer_state_dict": {}, "epoch": 3, "global_step": 12, "best_metric": 0.5,
                "config": {"model": {"name": "tiny"}}}, path)
    return path


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


# Explicit (slow) attention, written out independently of modeling/image_encoder.py.

def explicit_rel_pos_bias(q: torch.Tensor, rel_d: torch.Tensor, rel_h: torch.Tensor,
                          rel_w: torch.Tensor) -> torch.Tensor:
    """Bias of the reference implementation over an n³ window, written out by index: B×h×n³×n³.

    bias[(i,j,l), (a,e,k)] = q(i,j,l)·Rd[i−k] + q(i,j,a)·Rh[j−k] + q(i,j,e)·Rw[e−k]  (R[δ] = table[δ + n − 1]);
    this is what the reference's broadcasting of its per-axis einsums evaluates to (checked against it when the
    model was written), and what the published rel_pos tables were trained with. One (i, j) row of queries at a
    time; the last two terms do not depend on l.
    """
    b, h, n = q.shape[:3]
    a, e, k = (t.reshape(-1) for t in torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n),
                                                       indexing="ij"))
    rows = []
    for i in range(n):
        for j in range(n):
            first = q[:, :, i, j] @ rel_d[i - k + n - 1].T                                # B×h×n(l)×n³
            others = ((q[:, :, i, j, a] * rel_h[j - k + n - 1]).sum(-1)
                      + (q[:, :, i, j, e] * rel_w[e - k + n - 1]).sum(-1))                # B×h×n³
            rows.append(first + others[:, :, None, :])
    return torch.stack(rows, dim=2).reshape(b, h, n ** 3, n ** 3)


def explicit_window_attention(attn: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale + rel_pos_bias)·v over every position of one full n³ window (zeros included)."""
    b, n, c = window.shape[0], window.shape[1], window.shape[-1]
    h = attn.num_heads
    hd = c // h
    qkv = window.reshape(b, n ** 3, c) @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(b, n ** 3, 3, h, hd).permute(2, 0, 3, 1, 4)
    bias = explicit_rel_pos_bias(q.reshape(b, h, n, n, n, hd), attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w)
    weights = torch.softmax((q * hd ** -0.5) @ k.transpose(-1, -2) + bias, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, n, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias


def explicit_block(block: EncoderBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference block: norm1, zero-pad the grid to whole windows, attend per window, crop, residual, MLP."""
    b, g, c = x.shape[0], x.shape[1], x.shape[-1]
    w = block.window_size or g
    padded = math.ceil(g / w) * w
    y = torch.zeros(b, padded, padded, padded, c)
    y[:, :g, :g, :g] = block.norm1(x)
    out = torch.zeros_like(y)
    for d0 in range(0, padded, w):
        for h0 in range(0, padded, w):
            for w0 in range(0, padded, w):
                sl = (slice(None), slice(d0, d0 + w), slice(h0, h0 + w), slice(w0, w0 + w))
                out[sl] = explicit_window_attention(block.attn, y[sl])
    x = x + out[:, :g, :g, :g]
    return x + block.mlp(block.norm2(x))


def bright_blobs(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise volumes with one bright ellipsoid each (a stand-in for a hyperdense bleed) and its mask."""
    axis = torch.arange(S, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    labels = torch.zeros(batch, 1, S, S, S)
    for i in range(batch):
        centre = torch.randint(14, S - 14, (3,), generator=generator).float()
        radii = 5 + 5 * torch.rand(3, generator=generator)
        inside = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 \
            + ((xx - centre[2]) / radii[2]) ** 2 <= 1
        labels[i, 0][inside] = 1.0
    images = 0.5 * torch.randn(batch, 1, S, S, S, generator=generator) + 2.0 * labels
    return images, labels


def dice(logits: torch.Tensor, labels: torch.Tensor) -> float:
    pred = (logits > 0).float()
    return float(2 * (pred * labels).sum() / (pred.sum() + labels.sum()).clamp_min(1.0))


# ------------------------------------------------------------------------------------ the published layout

@pytest.fixture(scope="module")
def turbo():
    torch.manual_seed(0)
    return build_sam_med3d_turbo(visual_tokens=256)


def test_turbo_state_dict_is_the_published_list_plus_the_representation_head():
    with torch.device("meta"):  # shapes only: no 400 MB allocation
        model = build_sam_med3d_turbo()
    state = model.state_dict()
    sam_part = {k: tuple(v.shape) for k, v in state.items()
                if not k.startswith(("representation_head.", "refiner."))}
    for part, count in TURBO_PARTS.items():
        assert sum(v.numel() for k, v in state.items() if k.startswith(part + ".")) == count, part
    assert sum(math.prod(s) for s in sam_part.values()) == TURBO_TOTAL
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.", "representation_head.",
                             "refiner.")) for k in state)
    assert list(sam_part.items()) == list(published_layout().items())


def test_published_turbo_file_loads_strictly_and_reports_the_fresh_modules(tmp_path, turbo):
    layout = published_layout()
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=generator) for k, shape in layout.items()}
    path = tmp_path / "sam_med3d_turbo.pth"
    # The reference train.py layout, with a pickled argparse.Namespace under "args".
    torch.save({"epoch": 200, "model_state_dict": weights, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "lr_scheduler_state_dict": {}, "losses": [0.5], "dices": [0.8], "best_loss": 0.4, "best_dice": 0.8,
                "args": argparse.Namespace(task_name="turbo", lr=8e-4, gpu_ids=[0, 1], multi_click=False),
                "used_datas": ["a", "b"]}, path)
    head_before = {k: v.clone() for k, v in turbo.representation_head.state_dict().items()}

    report = load_pretrained(turbo, path)

    assert report.layout == "published"
    assert report.loaded_tensors == len(layout) == 324
    assert report.initialised_fresh == ("representation_head", "refiner")
    assert len(report.sha256) == 64
    state = turbo.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert all(torch.equal(state["representation_head." + k], v) for k, v in head_before.items())


def test_turbo_forward_shapes_batch_one_with_a_click(turbo):
    points = torch.tensor([[[64.0, 60.0, 70.0]]])
    with torch.no_grad():
        out = turbo(torch.randn(1, 1, 128, 128, 128), points, torch.tensor([[1]]))
    assert out["features"].shape == (1, 384, 8, 8, 8)
    assert out["masks"].shape == (1, 1, 128, 128, 128)
    assert out["low_res_masks"].shape == (1, 1, 32, 32, 32)
    assert out["iou_predictions"].shape == (1, 1)
    assert out["tokens"].shape == (1, 512, 256)
    assert out["ich_logit"].shape == (1,)
    assert turbo.img_size == 128 and turbo.encoder_config["global_attn_indexes"] == [2, 5, 8, 11]


# --------------------------------------------------------------------------------------- tiny build: outputs

def test_tiny_outputs_have_the_documented_shapes():
    model = tiny_model()
    points, labels = clicks()
    with torch.no_grad():
        out = model(volume(), points, labels)
        features = model.encode(volume())
        refined = model.decode(features, points, labels, mask_prompt=out["low_res_masks"])
        free = model.decode(features)
        multi = model.decode(features, points, labels, multimask_output=True)
        represented = model.represent(features)
    assert out["features"].shape == features.shape == (2, 48, 8, 8, 8)
    for result in (out, refined, free, multi):
        assert result["masks"].shape == (2, 1, S, S, S)
        assert result["low_res_masks"].shape == (2, 1, 32, 32, 32)
        assert result["iou_predictions"].shape == (2, 1)
    assert multi["multimask_low_res_masks"].shape == (2, 3, 32, 32, 32)
    assert multi["multimask_iou_predictions"].shape == (2, 3)
    assert represented["tokens"].shape == out["tokens"].shape == (2, 512, 32)
    assert represented["ich_logit"].shape == out["ich_logit"].shape == (2,)
    assert model.img_size == S and model.mask_size == 32
    # Full-size masks are the trilinear upsampling of the low-res logits.
    assert torch.allclose(free["masks"], F.interpolate(free["low_res_masks"], size=(S, S, S), mode="trilinear",
                                                       align_corners=False))
    # Prompts change the answer; the no-prompt path is not the click path.
    assert not torch.allclose(free["low_res_masks"], out["low_res_masks"])


def test_multimask_returns_the_mask_with_the_best_predicted_iou():
    model = tiny_model()
    points, labels = clicks()
    with torch.no_grad():
        out = model.decode(model.encode(volume()), points, labels, multimask_output=True)
    best = out["multimask_iou_predictions"].argmax(dim=1)
    for i in range(2):
        assert torch.equal(out["low_res_masks"][i, 0], out["multimask_low_res_masks"][i, best[i]])
        assert out["iou_predictions"][i, 0] == out["multimask_iou_predictions"].max(dim=1).values[i]


def test_features_computed_once_serve_several_prompt_rounds():
    model = tiny_model()
    images = volume()
    points, labels = clicks()
    features = model.encode(images)
    first = model.decode(features, points[:, :1], labels[:, :1])
    second = model.decode(features, points, labels, mask_prompt=first["low_res_masks"].detach())
    (first["masks"].mean() + second["masks"].mean()).backward()
    assert model.image_encoder.patch_embed.proj.weight.grad is not None
    with torch.no_grad():  # decoding is a pure function of features and prompts
        again = model.decode(features, points[:, :1], labels[:, :1])
    assert torch.equal(again["masks"], first["masks"].detach())


def test_padding_labels_are_not_a_point_and_their_coordinates_are_ignored():
    model = tiny_model()
    features = model.encode(volume()).detach()
    points = torch.tensor([[[10.0, 10.0, 10.0], [0.0, 0.0, 0.0]]] * 2)
    labels = torch.tensor([[1, -1]] * 2)
    moved = points.clone()
    moved[:, 1] = torch.tensor([1e6, float("nan"), -5.0])  # padding: anything goes
    with torch.no_grad():
        a = model.decode(features, points, labels)["masks"]
        b = model.decode(features, moved, labels)["masks"]
    assert torch.equal(a, b)


def test_click_encoding_pairs_axes_as_the_published_decoder_expects():
    """Pins the reference's axis pairing (see prompt_encoder.py): a click at the centre voxel of token
    (i0, i1, i2) has the same positional encoding as the dense encoding of token (i1, i0, i2)."""
    model = tiny_model()
    pe = model.prompt_encoder.pe_layer
    dense = model.prompt_encoder.get_dense_pe()[0]                       # C×8×8×8
    i0, i1, i2 = 1, 6, 3
    point = torch.tensor([[[8 * i0 + 3.5, 8 * i1 + 3.5, 8 * i2 + 3.5]]])  # voxel centre of token (i0, i1, i2)
    encoded = pe.encode((point + 0.5) / S)[0, 0]
    assert torch.allclose(encoded, dense[:, i1, i0, i2], atol=1e-5)
    assert not torch.allclose(encoded, dense[:, i0, i1, i2], atol=1e-2)


def test_representation_head_is_sized_from_the_encoder():
    encoder = ImageEncoderViT3D(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, out_chans=24,
                                window_size=0, global_attn_indexes=())
    head = RepresentationHead.for_encoder(encoder, visual_tokens=16)
    tokens = encoder(torch.randn(2, 1, 32, 32, 32)).flatten(2).transpose(1, 2)
    out = head(tokens)
    assert head.in_features == encoder.num_features == 24
    assert out["tokens"].shape == (2, 64, 16) and out["ich_logit"].shape == (2,)
    assert build_tiny(visual_tokens=7).representation_head.proj.out_features == 7


# ------------------------------------------------------------------------------- attention numerics (SDPA)

@pytest.mark.parametrize("dim,heads,grid,window", [
    (64, 4, 8, 12),   # the tiny build's window block: 8³ zero-padded to 12³
    (64, 2, 8, 14),   # the published geometry (8³ in a 14³ window) at a small width
    (64, 4, 8, 0),    # global block
    (32, 2, 5, 3),    # several windows, the last ones partly padding
])
def test_fused_attention_matches_the_explicit_padded_reference(dim, heads, grid, window):
    torch.manual_seed(0)
    block = EncoderBlock(dim, heads, mlp_ratio=4.0, window_size=window, grid_size=grid)
    with torch.no_grad():
        for table in (block.attn.rel_pos_d, block.attn.rel_pos_h, block.attn.rel_pos_w):
            table.normal_(0.0, 0.5)
        block.attn.qkv.bias.normal_(0.0, 1.0)
    x = torch.randn(2, grid, grid, grid, dim, requires_grad=True)

    fast = block(x)
    fast_grads = torch.autograd.grad(fast.square().sum(), [x, block.attn.qkv.bias, block.attn.qkv.weight,
                                                            block.attn.rel_pos_d, block.attn.rel_pos_h,
                                                            block.attn.rel_pos_w])
    slow = explicit_block(block, x)
    slow_grads = torch.autograd.grad(slow.square().sum(), [x, block.attn.qkv.bias, block.attn.qkv.weight,
                                                            block.attn.rel_pos_d, block.attn.rel_pos_h,
                                                            block.attn.rel_pos_w])
    assert relative_error(fast - x, slow - x) < 1e-4  # compare the block's update, not the residual input
    for got, want in zip(fast_grads, slow_grads):
        assert relative_error(got, want) < 1e-4


# ------------------------------------------------------------------------------------------ loading

def test_own_checkpoint_loads_strictly_including_the_head(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    path = save_own_checkpoint(source, tmp_path / "best_model.pth")
    report = load_pretrained(target, path)
    assert report.layout == "project" and report.initialised_fresh == ()
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_module_prefix_from_ddp_is_stripped(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    prefixed = {"module." + k: v for k, v in source.state_dict().items()}
    load_pretrained(target, save_own_checkpoint(source, tmp_path / "ddp.pth", prefixed))
    bare = tmp_path / "bare.pth"
    torch.save(prefixed, bare)
    third = tiny_model(seed=3)
    assert load_pretrained(third, bare).layout == "state_dict"
    for model in (target, third):
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))


def test_strict_mismatch_names_the_file_and_every_kind_of_difference(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    state = source.state_dict()
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra.weight"] = torch.zeros(3)
    state["representation_head.proj.weight"] = torch.zeros(5, 48)
    path = save_own_checkpoint(source, tmp_path / "broken.pth", state)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (in the model, not in the file) (1)" in message and "mask_decoder.iou_token.weight" in message
    assert "unexpected keys (in the file, not in the model) (1)" in message and "image_encoder.extra.weight" in message
    assert "shape mismatches (1)" in message and "checkpoint 5×48 vs model 32×48" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing was loaded


def test_mismatch_report_lists_twenty_then_counts_the_rest(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    state = dict(source.state_dict(), **{f"junk.{i:02d}": torch.zeros(1) for i in range(25)})
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(target, save_own_checkpoint(source, tmp_path / "junk.pth", state))
    message = str(info.value)
    assert "(25):" in message and "junk.19" in message and "junk.20" not in message and "... and 5 more" in message


def test_non_strict_loads_the_matching_part(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    state = source.state_dict()
    state["representation_head.proj.weight"] = torch.zeros(5, 48)
    report = load_pretrained(target, save_own_checkpoint(source, tmp_path / "partial.pth", state), strict=False)
    assert "representation_head.proj.weight" in report.skipped
    assert torch.equal(target.state_dict()["image_encoder.pos_embed"], source.state_dict()["image_encoder.pos_embed"])
    assert not torch.equal(target.representation_head.proj.weight, source.representation_head.proj.weight)


def test_head_is_optional_only_for_sam_med3d_files(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    sam_only = {k: v for k, v in source.state_dict().items() if not k.startswith("representation_head.")}
    published = tmp_path / "published.pth"
    torch.save({"model_state_dict": sam_only, "args": argparse.Namespace(lr=1e-4)}, published)
    assert load_pretrained(target, published).initialised_fresh == ("representation_head",)
    with pytest.raises(CheckpointMismatchError, match="representation_head.proj.weight"):
        load_pretrained(target, save_own_checkpoint(source, tmp_path / "own_without_head.pth", sam_only))
    with_refiner = tiny_model(seed=3, refiner=True)
    assert load_pretrained(with_refiner, published).initialised_fresh == ("representation_head", "refiner")


# ----------------------------------------------------------------- the pretrained prompt path and the refiner

def test_no_mask_is_the_all_zero_mask_prompt_the_published_weights_learned():
    """SAM-Med3D's training and inference never decode without a mask prompt: "no mask yet" is an all-zero low-res
    mask through the mask-downscaling convs, so the published no_mask_embed is an untrained random vector. Prompt-free
    and first-click decoding must therefore equal decoding with an explicit zero mask and ignore no_mask_embed.
    (Checked once against uni-medical/SAM-Med3D f3de1fa: its prompt_encoder(points=None, boxes=None,
    masks=zeros) + mask_decoder gives these logits for the same weights.)"""
    model = tiny_model()
    features = model.encode(volume()).detach()
    points, labels = clicks()
    zeros = torch.zeros(2, 1, 32, 32, 32)
    with torch.no_grad():
        free = model.decode(features)["low_res_masks"]
        first_click = model.decode(features, points, labels)["low_res_masks"]
        assert torch.equal(free, model.decode(features, mask_prompt=zeros)["low_res_masks"])
        assert torch.equal(first_click, model.decode(features, points, labels, mask_prompt=zeros)["low_res_masks"])
        # The dense prompt the decoder got is the downscaled zero mask, not no_mask_embed.
        _, dense = model.prompt_encoder(None, None, zeros, batch_size=2)
        expected, _ = model.mask_decoder(features, model.prompt_encoder.get_dense_pe(),
                                         features.new_zeros(2, 0, 48), dense)
        assert torch.equal(free, expected[:, :1])
        model.prompt_encoder.no_mask_embed.weight.normal_(0.0, 10.0)
        assert torch.equal(free, model.decode(features)["low_res_masks"])


def test_refiner_starts_as_the_identity_and_then_learns_from_the_image():
    plain = tiny_model(seed=4)
    refined = tiny_model(seed=4, refiner=True)
    refined.load_state_dict({**refined.state_dict(), **plain.state_dict()})
    images = volume()
    points, labels = clicks()
    with torch.no_grad():
        for prompts in ((), (points, labels)):
            assert torch.equal(plain(images, *prompts)["masks"], refined(images, *prompts)["masks"])
            # ``coarse_masks`` is the decoder's own answer before refinement (deep supervision trains it).
            assert torch.equal(plain(images, *prompts)["masks"], refined(images, *prompts)["coarse_masks"])
    # The correction sees the image: after one step on a bright-blob batch the refined logits differ, and only
    # the refiner's parameters and the decoder path receive gradient from the correction.
    blobs, truth = bright_blobs(2, torch.Generator().manual_seed(5))
    out = refined(blobs)
    F.binary_cross_entropy_with_logits(out["masks"], truth).backward()
    assert refined.refiner.unfold.weight.grad.abs().sum() > 0
    with torch.no_grad():
        refined.refiner.unfold.bias.fill_(-3.0)
        out = refined(blobs)
    assert torch.allclose(out["masks"], out["coarse_masks"] - 3.0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the 2×1×64×64×64 input volume"):
        refined.decode(refined.encode(images))


def test_refiner_answers_the_same_in_training_and_inference_layouts():
    # Training on a CPU runs the refiner on a channels-last view (faster backward), inference on the default one:
    # the two must agree, and the training path must still pass gradient to its input and every parameter.
    torch.manual_seed(6)
    refiner = MaskRefiner3D()
    nn.init.normal_(refiner.unfold.weight, std=0.1)   # a trained-looking refiner, not the zero-initialised identity
    image, coarse = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16, requires_grad=True)
    with torch.no_grad():
        inferred = refiner(image, coarse)
    trained = refiner(image, coarse)
    assert trained.shape == inferred.shape == coarse.shape
    assert torch.allclose(trained, inferred, atol=1e-5) and not torch.equal(trained, coarse)
    trained.square().mean().backward()
    assert coarse.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.parameters())


def test_refiner_gives_one_volume_the_answer_it_gets_in_a_batch():
    # A single volume goes through as a batch of two copies on the CPU (PyTorch's slow kernel for one small
    # volume): the answer and the gradients must be those of the volume alone.
    torch.manual_seed(7)
    refiner = MaskRefiner3D()
    nn.init.normal_(refiner.unfold.weight, std=0.1)
    image, coarse = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        pair = refiner(image, coarse)
        single = refiner(image[1:], coarse[1:])
    assert single.shape == (1, 1, 16, 16, 16)
    assert torch.allclose(single, pair[1:], atol=1e-5) and not torch.allclose(single, pair[:1])
    alone = coarse[:1].clone().requires_grad_()
    refiner(image[:1], alone).square().mean().backward()
    batched = coarse.clone().requires_grad_()
    refiner.zero_grad()
    refiner(image, batched)[:1].square().mean().backward()
    assert torch.allclose(alone.grad, batched.grad[:1], atol=1e-6) and alone.grad.abs().sum() > 0


@pytest.mark.parametrize("low, size", [(32, 64), (8, 32), (6, 18), (12, 20)])
def test_mask_upsampling_is_trilinear_interpolation(low, size):
    # The CPU's sliced upsampling (whole factors 2, 4, 3) and the fallback (20 / 12) against F.interpolate:
    # same values and same gradients.
    torch.manual_seed(low)
    logits = torch.randn(2, 1, low, low, low, dtype=torch.float64, requires_grad=True)
    reference = F.interpolate(logits, size=(size,) * 3, mode="trilinear", align_corners=False)
    upsampled = upsample_trilinear(logits, size)
    assert upsampled.shape == (2, 1, size, size, size)
    assert torch.allclose(upsampled, reference, atol=1e-12)
    weights = torch.randn_like(reference)
    expected, = torch.autograd.grad((reference * weights).sum(), logits)
    got, = torch.autograd.grad((upsampled * weights).sum(), logits)
    assert torch.allclose(got, expected, atol=1e-10)


def test_refiner_can_be_switched_off():
    assert build_tiny(refiner=False).refiner is None
    assert not any(k.startswith("refiner.") for k in build_tiny(refiner=False).state_dict())
    assert build_model(ModelConfig(name="tiny", mask_refiner=False)).refiner is None


class _Hostile:
    """Unpickling this would create a file: proof of code execution if it ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    zipped = tmp_path / "hostile.pth"
    torch.save({"model_state_dict": {}, "payload": _Hostile(marker)}, zipped)
    legacy = tmp_path / "hostile.pkl"
    legacy.write_bytes(pickle.dumps({"payload": _Hostile(marker)}))
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match=str(path)) as info:
            load_pretrained(tiny_model(), path)
        assert "weights_only=False" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"definitely not a checkpoint", bytes(range(256)) * 8, b"PK\x03\x04junk"])
def test_garbage_file_gives_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_pretrained(tiny_model(), path)


def test_wrong_content_and_missing_file_are_explained(tmp_path):
    tensors = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], tensors)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_pretrained(tiny_model(), tensors)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"model_state_dict": {"a": 1}}, not_tensors)
    with pytest.raises(CheckpointError, match="map parameter names to tensors"):
        load_pretrained(tiny_model(), not_tensors)
    with pytest.raises(CheckpointNotFoundError, match="nowhere.pth"):
        load_pretrained(tiny_model(), tmp_path / "nowhere.pth")


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)


def test_turbo_alias_offline_fails_at_once_with_instructions(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointUnavailableError) as info:
        build_model(ModelConfig(name="tiny", pretrained_checkpoint="turbo"))
    message = str(info.value)
    assert TURBO_CHECKPOINT_URL in message and "HF_HUB_OFFLINE" in message and "local path" in message


def test_turbo_alias_unreachable_hub_gives_the_same_advice(monkeypatch, empty_hub_cache):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error and no cached copy")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointUnavailableError, match="local path") as info:
        resolve_checkpoint("turbo")
    assert TURBO_CHECKPOINT_URL in str(info.value)


def test_turbo_alias_uses_the_hub_cache_when_present(monkeypatch, empty_hub_cache, tmp_path):
    cached = tmp_path / "sam_med3d_turbo.pth"
    cached.write_bytes(b"x")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo_id, filename: str(cached))
    assert resolve_checkpoint("turbo") == cached


# --------------------------------------------------------------------- memory, precision, freezing, building

def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    plain = tiny_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_gradient_checkpointing(True)
    points, labels = clicks()
    results = []
    for model in (plain, checkpointed):
        out = model(volume(), points, labels)
        (out["masks"].square().mean() + out["ich_logit"].sum()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():  # None where a part is unused (e.g. the mask-prompt convs)
        assert (grad is None and grads_b[name] is None) or torch.equal(grad, grads_b[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward_on_cpu(dtype):
    model = tiny_model()
    points, labels = clicks()
    with torch.no_grad():
        reference = model(volume(), points, labels)["low_res_masks"]
    with torch.autocast("cpu", dtype=dtype):
        out = model(volume(), points, labels)
    assert out["features"].dtype == dtype
    low_res = out["low_res_masks"].float()
    assert torch.isfinite(low_res).all() and torch.isfinite(out["masks"].float()).all()
    correlation = torch.corrcoef(torch.stack([low_res.flatten(), reference.flatten()]))[0, 1]
    assert correlation > 0.99
    (out["masks"].float().mean() + out["ich_logit"].float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_freeze_encoder_leaves_only_the_rest_trainable():
    model = build_model(ModelConfig(name="tiny", visual_tokens=16, freeze_encoder=True))
    encoder_params = {id(p) for p in model.image_encoder.parameters()}
    trainable = trainable_parameters(model)
    assert all(not p.requires_grad for p in model.image_encoder.parameters())
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters()} - encoder_params
    out = model(volume())
    (out["masks"].mean() + out["ich_logit"].sum()).backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert model.mask_decoder.iou_token.weight.grad is not None or model.mask_decoder.mask_tokens.weight.grad is not None
    assert model.representation_head.proj.weight.grad is not None


def test_build_model_applies_the_config_and_rejects_unknown_names():
    model = build_model(ModelConfig(name="tiny", visual_tokens=24, use_gradient_checkpointing=True))
    assert model.image_encoder.gradient_checkpointing and model.visual_tokens == 24
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="sam_med3d_turbo, tiny"):
        build_model(ModelConfig(name="vit_h"))
    assert set(model_module.MODEL_REGISTRY) == {"sam_med3d_turbo", "tiny"}


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("images", [
    torch.zeros(1, S, S, S),                      # rank 4
    torch.zeros(1, 2, S, S, S),                   # two channels
    torch.zeros(1, 1, S, S, S + 1),               # wrong spatial size
    torch.zeros(1, 1, 128, 128, 128),             # the big model's size
    torch.zeros(1, 1, S, S, S, dtype=torch.int16),
    torch.zeros(1, 1, S, S, S, dtype=torch.float64),
])
def test_bad_volumes_are_rejected_with_expected_and_actual_shape(images):
    with pytest.raises(ValueError) as info:
        tiny_model().encode(images)
    message = str(info.value)
    assert f"B×1×{S}×{S}×{S}" in message and "×".join(map(str, images.shape)) in message


@pytest.mark.parametrize("points,labels,match", [
    (torch.tensor([[[10.0, 10.0, 64.0]]]), torch.tensor([[1]]), "inside the 64×64×64"),
    (torch.tensor([[[-0.5, 10.0, 10.0]]]), torch.tensor([[0]]), "inside the 64×64×64"),
    (torch.tensor([[[float("nan"), 1.0, 1.0]]]), torch.tensor([[1]]), "inside the 64×64×64"),
    (torch.tensor([[[1.0, 1.0]]]), torch.tensor([[1]]), "B×P×3"),
    (torch.tensor([[[1.0, 1.0, 1.0]]]), torch.tensor([[1.0]]), "integer"),
    (torch.tensor([[[1.0, 1.0, 1.0]]]), torch.tensor([[2]]), r"values in \{-1, 0, 1\}"),
    (torch.tensor([[[1.0, 1.0, 1.0]]] * 2), torch.tensor([[1]] * 2), "B=1"),
    (torch.tensor([[[1.0, 1.0, 1.0]]]), None, "together"),
])
def test_bad_points_are_rejected(points, labels, match):
    model = tiny_model()
    features = model.encode(volume(batch=1))
    with pytest.raises(ValueError, match=match):
        model.decode(features, points, labels)


def test_bad_mask_prompt_and_features_are_rejected():
    model = tiny_model()
    features = model.encode(volume(batch=1))
    with pytest.raises(ValueError, match="B×1×32×32×32"):
        model.decode(features, mask_prompt=torch.zeros(1, 1, 64, 64, 64))
    with pytest.raises(ValueError, match="B×48×8×8×8"):
        model.decode(features[:, :16])
    with pytest.raises(ValueError, match="B×48×8×8×8"):
        model.represent(features.flatten(2))


# ------------------------------------------------------------------------------------------ BLIP-2 export

def test_exported_encoder_and_head_reproduce_the_model_bit_for_bit(tmp_path):
    model = tiny_model().eval()
    payload = export_encoder(model, {"preprocessing": {"normalization": "zscore"}})
    assert payload["encoder_config"] == {"img_size": 64, "patch_size": 8, "in_chans": 1, "embed_dim": 64,
                                         "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "out_chans": 48,
                                         "window_size": 12, "global_attn_indexes": [1]}
    assert (payload["num_features"], payload["visual_tokens"], payload["num_tokens"]) == (48, 32, 512)
    assert list(payload["image_encoder_state_dict"]) == list(model.image_encoder.state_dict())
    original = model.image_encoder.pos_embed.detach().clone()
    with torch.no_grad():  # training goes on after an export: the payload must not follow the live weights
        model.image_encoder.pos_embed.add_(1.0)
    assert torch.equal(payload["image_encoder_state_dict"]["pos_embed"], original)
    with torch.no_grad():
        model.image_encoder.pos_embed.copy_(original)
    path = tmp_path / "sam_encoder.pth"
    torch.save(payload, path)

    encoder = load_sam_encoder(path)
    head = load_representation_head(path)

    assert list(encoder.state_dict()) == list(payload["image_encoder_state_dict"])
    assert encoder.num_features == 48 and not encoder.training and not head.training
    images = volume()
    with torch.no_grad():
        features = model.encode(images)
        tokens = encoder(images)
        expected = model.represent(features)
        got = head(tokens)
    assert torch.equal(tokens, features.flatten(2).transpose(1, 2))
    assert torch.equal(got["tokens"], expected["tokens"]) and torch.equal(got["ich_logit"], expected["ich_logit"])
    encoder.train()  # as a BLIP-2 visual encoder being tuned: every tensor must receive a gradient
    encoder(images).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_export_rejects_key_clashes_and_wrong_files(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="num_features"):
        export_encoder(model, {"num_features": 1})
    training_file = save_own_checkpoint(model, tmp_path / "best_model.pth")
    with pytest.raises(CheckpointError, match="sam_encoder.pth"):
        load_sam_encoder(training_file)


# ------------------------------------------------------------------------------------------ learning

def test_tiny_learns_bright_blobs_prompt_free_and_with_clicks():
    torch.manual_seed(0)
    model = build_tiny(visual_tokens=16, refiner=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    val_images, val_labels = bright_blobs(4, torch.Generator().manual_seed(123))
    val_points = torch.stack([torch.nonzero(val_labels[i, 0])[0].float() for i in range(4)]).unsqueeze(1)
    positive = torch.ones(4, 1, dtype=torch.long)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            return (dice(model(val_images)["masks"], val_labels),
                    dice(model(val_images, val_points, positive)["masks"], val_labels))

    before = evaluate()
    for _ in range(60):
        images, labels = bright_blobs(2, generator)
        features = model.encode(images)
        free = model.decode(features)
        inside = [torch.nonzero(labels[i, 0]) for i in range(2)]
        points = torch.stack([v[torch.randint(len(v), (1,), generator=generator)] for v in inside]).float()
        clicked = model.decode(features, points, torch.ones(2, 1, dtype=torch.long), free["low_res_masks"].detach())
        loss = sum(F.binary_cross_entropy_with_logits(m, labels) + 1 - 2 * (m.sigmoid() * labels).sum()
                   / (m.sigmoid().sum() + labels.sum()) for m in (free["masks"], clicked["masks"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert max(before) < 0.2
    assert after[0] > 0.6 and after[1] > 0.6, (before, after)


# --------------------------------------------------------------------- load_trained: checkpoint -> model

def test_load_trained_rebuilds_the_model_and_config_from_a_project_checkpoint(tmp_path):
    source = tiny_model(seed=3, visual_tokens=32, refiner=True)
    config = Config(model=ModelConfig(name="tiny", visual_tokens=32, pretrained_checkpoint="turbo",
                                      freeze_encoder=True))
    path = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": source.state_dict(), "config": config.to_dict()}, path)
    loaded, saved = load_trained(path)   # no pretrained download: the checkpoint holds every weight
    assert saved == config and not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_trained_names_the_file_for_foreign_or_mismatched_checkpoints(tmp_path):
    encoder_only = tmp_path / "sam_encoder.pth"
    torch.save({"image_encoder_state_dict": {}}, encoder_only)
    with pytest.raises(CheckpointError, match=r"sam_encoder\.pth: not a checkpoint written by train\.py"):
        load_trained(encoder_only)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model_state_dict": tiny_model().state_dict(),
                "config": Config(model=ModelConfig(name="tiny", visual_tokens=8)).to_dict()}, wrong)
    with pytest.raises(CheckpointMismatchError, match=r"wrong\.pth: weights do not fit the 'tiny' architecture"):
        load_trained(wrong)
    # A checkpoint from before the mask refiner existed has no mask_refiner setting: it means "no refiner".
    legacy_config = Config(model=ModelConfig(name="tiny", visual_tokens=32)).to_dict()
    del legacy_config["model"]["mask_refiner"]
    legacy = tmp_path / "legacy.pth"
    torch.save({"model_state_dict": tiny_model(visual_tokens=32).state_dict(), "config": legacy_config}, legacy)
    assert load_trained(legacy)[0].refiner is None
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_trained(garbage)
