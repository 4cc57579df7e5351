"""bench/op_bench.py times each replaced CPU kernel against what it replaced and writes one table row per kernel."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import op_bench  # noqa: E402


def test_writes_a_row_per_kernel_with_both_timings(tmp_path):
    out = tmp_path / "ops.md"
    assert op_bench.main(["--repeats", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "operation" not in line]
    assert [row.split(" | ")[0].lstrip("| ").split(" ")[0] for row in rows] == ["mask", "mask", "tiny", "AdamW"]
    for row in rows:
        before, now, ratio = re.fullmatch(r"\|.*\| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+)× \|", row).groups()
        assert float(before) > 0 and float(now) > 0
        assert abs(float(ratio) - float(before) / float(now)) < 0.06 * float(ratio) + 0.05
