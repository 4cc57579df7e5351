"""Which checkpoints make up a prediction ensemble, and the rule that they must share one preprocessing.

``predict.py --checkpoint`` takes one or more of: a checkpoint file (``best_model.pth``, ``latest_model.pth``), a
run folder (its ``best_model.pth``), or a cross-validation folder (``fold_<k>/best_model.pth`` of every fold, as
``train.py --folds_dir`` writes them). ``predict.Predictor`` loads each once and averages their probabilities
(sigmoid of the logits) on the shared preprocessed grid, which is why every member must have been trained with the
same ``Preprocessing``: the same input volume has to mean the same thing to each of them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from data.preprocess import Preprocessing

# The name train.py gives the best checkpoint (trainer.BEST_NAME; an inference tool does not import the trainer).
BEST_CHECKPOINT = "best_model.pth"
_FOLD = re.compile(r"fold_(\d+)")


class EnsembleError(ValueError):
    """The given checkpoints cannot form an ensemble; the message names the paths and the fix."""


def resolve_checkpoints(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoint files for ``--checkpoint`` values (files, run folders, cross-validation folders), in the given
    order with folds by number; EnsembleError naming every value that holds no checkpoint, and duplicates."""
    found: list[Path] = []
    problems = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            found.append(path)
        elif (path / BEST_CHECKPOINT).is_file():
            found.append(path / BEST_CHECKPOINT)
        elif path.is_dir():
            folds = sorted((int(m.group(1)), p) for p in path.iterdir()
                           if (m := _FOLD.fullmatch(p.name)) and p.is_dir())
            missing = [str(p / BEST_CHECKPOINT) for _, p in folds if not (p / BEST_CHECKPOINT).is_file()]
            if not folds:
                problems.append(f"{path}: a folder without {BEST_CHECKPOINT} or fold_<k>/ subfolders")
            elif missing:
                problems.append(f"{path}: fold(s) not trained yet, missing {', '.join(missing)} (finish them with "
                                "train.py --folds_dir ... --resume auto, or name the checkpoints one by one)")
            else:
                found += [p / BEST_CHECKPOINT for _, p in folds]
        else:
            problems.append(f"{path}: no such checkpoint file or folder")
    resolved = [os.path.realpath(p) for p in found]
    problems += [f"{p}: given more than once" for i, p in enumerate(found) if resolved[i] in resolved[:i]]
    if problems:
        raise EnsembleError("--checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    return found


def shared_preprocessing(checkpoints: Sequence[Path], preprocessings: Sequence[Preprocessing]) -> Preprocessing:
    """The one Preprocessing of all members; EnsembleError listing each member's when they differ."""
    if any(p != preprocessings[0] for p in preprocessings[1:]):
        listed = "\n".join(f"  - {path}: {p.to_dict()}" for path, p in zip(checkpoints, preprocessings))
        raise EnsembleError("--checkpoint: an ensemble averages probabilities on one preprocessed grid, but these "
                            f"checkpoints were trained with different preprocessing:\n{listed}\nEnsemble only runs "
                            "trained with the same --target_spacing, --hu_window, --normalization and --model")
    return preprocessings[0]
