"""Numerical check of ichseg's SAM-Med3D against the reference implementation (run by hand, never in tests/CI).

    git clone https://github.com/uni-medical/SAM-Med3D /tmp/SAM-Med3D      # on a machine with internet
    python bench/reference_check.py --reference /tmp/SAM-Med3D

Builds the reference ``vit_b_ori`` and our ``sam_med3d_turbo`` (without the mask refiner, which the reference does not
have), gives both the same random weights, and prints the largest absolute differences of: the encoder features,
prompt-free decoding (the reference fed ``points=None`` and the all-zero mask prompt its training and inference use),
a one-click decode, and — for contrast — the reference fed its untrained ``no_mask_embed`` instead. The reference's
package imports torchvision for its 2-D tools; empty stub modules stand in for those imports.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import build_sam_med3d_turbo  # noqa: E402

logger = logging.getLogger("ichseg.reference_check")


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``torchvision.*`` modules: the reference imports torchvision for its 2-D tools only."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = types.ModuleType(spec.name)
        module.__path__ = []  # type: ignore[attr-defined]
        module.__getattr__ = lambda attribute: None  # type: ignore[attr-defined]
        return module

    def exec_module(self, module):  # noqa: ANN001
        return None


def _import_reference(root: Path):  # noqa: ANN202 - returns the reference's Sam3D
    sys.meta_path.insert(0, _StubTorchvision())
    sys.path.insert(0, str(root))
    from segment_anything.build_sam3D import sam_model_registry3D  # type: ignore[import-not-found]

    return sam_model_registry3D["vit_b_ori"](checkpoint=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of uni-medical/SAM-Med3D")
    parser.add_argument("--weight_std", type=float, default=0.05, help="std of the shared random weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generator = torch.Generator().manual_seed(args.seed)
    reference = _import_reference(args.reference).eval()
    ours = build_sam_med3d_turbo(refiner=False).eval()
    shared = {k: torch.randn(v.shape, generator=generator) * args.weight_std for k, v in reference.state_dict().items()}
    reference.load_state_dict(shared)
    ours.load_state_dict({**ours.state_dict(), **{k: v for k, v in shared.items() if k in ours.state_dict()}})
    image = torch.randn(1, 1, 128, 128, 128, generator=generator)
    point, label = torch.tensor([[[60.0, 70.0, 50.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        features = reference.image_encoder(image)
        report = {"encoder features": (features, ours.encode(image))}
        pe = reference.prompt_encoder.get_dense_pe()
        zero_mask = torch.zeros(1, 1, 32, 32, 32)

        def reference_decode(points, masks):
            sparse, dense = reference.prompt_encoder(points=points, boxes=None, masks=masks)
            return reference.mask_decoder(image_embeddings=features, image_pe=pe, sparse_prompt_embeddings=sparse,
                                          dense_prompt_embeddings=dense, multimask_output=False)[0]

        report["prompt-free (zero mask prompt)"] = (reference_decode(None, zero_mask),
                                                    ours.decode(features)["low_res_masks"])
        report["one click (zero mask prompt)"] = (reference_decode((point, label), zero_mask),
                                                  ours.decode(features, point, label)["low_res_masks"])
        report["contrast: reference with no_mask_embed"] = (reference_decode(None, None),
                                                            ours.decode(features)["low_res_masks"])
    for name, (expected, got) in report.items():
        logger.info("%-42s max |diff| %.3g (output scale %.3g)", name, float((expected - got).abs().max()),
                    float(expected.abs().max()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
