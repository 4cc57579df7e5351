"""Shared test set-up: the project root on sys.path and wandb kept offline and quiet."""
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run tiny models whose ops are too small to split across threads; on a 2-core CI machine two torch
    threads made tests/test_training.py ~9x slower (231 s vs 25 s measured) through contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _offline_tracking(monkeypatch, tmp_path):
    """No test may reach the network or write wandb runs outside its temporary folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _log_handlers_removed_after_each_test():
    """utils.setup_logging binds its console handler to the sys.stderr of the moment, which inside a test is
    pytest's capture of that test (closed afterwards): handlers a test added leave with it."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
            handler.close()


# The cohort the suite's learning test trains on: NOT the self-test's (which the recipe was first tuned on) but
# what real ICH cohorts look like: 5 mm slices, bleeds of 3-12 mL (~0.1 % of the head), scans larger than one
# 64³ window at 2 mm (86×86×70 voxels after resampling), ICH-negative scans without masks.
LEARNING_COHORT = {"n_train": 16, "n_val": 6, "shape": (96, 96, 28), "spacing": (1.8, 1.8, 5.0), "seed": 5,
                   "min_ml": 3.0, "max_ml": 12.0}
LEARNING_EPOCHS = 20
LEARNING_VAL_EVERY = 5


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One real CLI training run with the self-test's recipe on LEARNING_COHORT, shared by the end-to-end, predict
    and BLIP-2 tests (training is the slow part; each test only reads its outputs)."""
    import train
    from config import Config
    from selftest import selftest_argv
    from synthetic import generate_cohort

    root = tmp_path_factory.mktemp("trained_run")
    cohort = generate_cohort(root / "data", **LEARNING_COHORT)
    output_dir = root / "run"
    code = train.main(selftest_argv(cohort, output_dir, Config(), epochs=LEARNING_EPOCHS,
                                    val_every=LEARNING_VAL_EVERY))
    assert code == 0, "the shared training run failed"
    return {"cohort": cohort, "output_dir": output_dir}
