"""The learning benchmark's bookkeeping (its trainings are too long for the suite: bench/results/learning_bench.md)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import learning_bench as LB  # noqa: E402


def _run(seed: int, dice: float, empty: str, train_s: float) -> dict:
    return {"seed": seed, "train_s": train_s, "first_epoch_dice_over_0.5": 20, "epochs": 40, "dice": dice,
            "negatives_empty": empty, "fp_ml": 0.5, "volume_error_ml": 1.0, "dice_1click": dice + 0.01,
            "dice_3click": dice + 0.02, "dice_5click": dice + 0.03}


def test_seeds_replace_the_recipe_seed_only():
    recipe = LB.recipe_with_seed(7)
    assert recipe[recipe.index("--seed") + 1] == "7" and recipe.count("--seed") == 1
    assert len(recipe) == len(LB.RECIPE) and LB.RECIPE[LB.RECIPE.index("--seed") + 1] == "0"


def test_several_seeds_get_a_row_each_and_a_mean_row():
    runs = [_run(0, 0.74, "3/4", 270.0), _run(1, 0.90, "4/4", 290.0)]
    result = {"cohort": "repro", "description": "d", "ours": runs[0], "seeds": runs}
    table = LB.markdown([result], "python bench/learning_bench.py --seeds 0 1", "")
    rows = [line for line in table.splitlines() if line.startswith("| repro")]
    assert len(rows) == 3
    assert "seed 0" in rows[0] and "0.740" in rows[0] and "seed 1" in rows[1] and "0.900" in rows[1]
    mean = rows[2]
    assert "2 seeds" in mean and "max 290 s" in mean and "mean 0.820, min 0.740" in mean
    assert "mean 0.830 / 0.840 / 0.850" in mean and "7/8" in mean
    # One seed: the single row of before, without a seed label.
    single = LB.markdown([{"cohort": "repro", "description": "d", "ours": runs[0]}], "cmd", "")
    assert [line for line in single.splitlines() if line.startswith("| repro")][0].startswith("| repro | ichseg tiny |")


def test_pooled_negative_counts():
    assert LB._pooled(["3/4", "4/4", "0/6"]) == "7/14"
    with pytest.raises(ValueError):
        LB._pooled(["three/4"])


def test_decoder_dice_is_a_column_and_missing_values_read_as_a_dash():
    runs = [{**_run(0, 0.74, "3/4", 270.0), "decoder_dice": 0.0}, {**_run(1, 0.90, "4/4", 290.0), "decoder_dice": 0.5}]
    table = LB.markdown([{"cohort": "repro", "description": "d", "ours": runs[0], "seeds": runs}], "cmd", "")
    rows = [line for line in table.splitlines() if line.startswith("| repro")]
    assert [row.rstrip(" |").rsplit("| ", 1)[1] for row in rows] == ["0.000", "0.500", "0.250"]
    header = next(line for line in table.splitlines() if line.startswith("| cohort"))
    assert header.count("|") == rows[0].count("|") == rows[2].count("|")
    # Runs from before the probe (no key, or one seed without it) show a dash, not a number.
    old = [_run(0, 0.74, "3/4", 270.0), {**_run(1, 0.90, "4/4", 290.0), "decoder_dice": 0.5}]
    table = LB.markdown([{"cohort": "repro", "description": "d", "ours": old[0], "seeds": old}], "cmd", "")
    rows = [line for line in table.splitlines() if line.startswith("| repro")]
    assert [row.rstrip(" |").rsplit("| ", 1)[1] for row in rows] == ["–", "0.500", "–"]


def test_the_readme_documents_the_recipe_the_bench_runs():
    """The README's CPU recipe is the one whose numbers it prints: its flags equal RECIPE's, in any order."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Tiny build on a CPU**"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    words = shlex.split(block)
    documented = words[words.index("--model"):]

    def as_options(arguments: list[str]) -> dict[str, tuple[str, ...]]:
        options: dict[str, tuple[str, ...]] = {}
        for i, word in enumerate(arguments):
            if word.startswith("--"):
                values = []
                for value in arguments[i + 1:]:
                    if value.startswith("--"):
                        break
                    values.append(value)
                options[word] = tuple(values)
        return options

    assert as_options(documented) == as_options(LB.RECIPE)


def test_held_out_descriptions_are_written_from_the_cohort_parameters():
    eighth = LB.COHORTS["eighth"]
    assert eighth.description == ("held out: 288×288×30 at 0.8×0.8×5 mm, 3–35 mL, all five kinds, up to 3 foci in "
                                  "35 %, blood 56–86 HU, noise 4–9 HU, streaks in 35 %; 24 + 12 scans")
    for name in ("holdout", "unseen", "fresh", "eighth", "ninth"):
        spec = LB.COHORTS[name]
        assert f"{'×'.join(map(str, spec.shape))} at" in spec.description
        assert f"streaks in {100 * spec.appearance.streak_fraction:g} %" in spec.description
        assert (spec.n_train, spec.n_val, spec.min_ml) == (24, 12, 3)
