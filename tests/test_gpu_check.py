"""bench/gpu_check.py: the reduced (--smoke) mode end to end on the CPU, and the table's bookkeeping."""
from __future__ import annotations

import time

import torch

from bench import gpu_check
from bench.gpu_check import NOT_ON_CPU, PENDING, SMOKE, Setting


def table_rows(markdown: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header cells, rows as {column: cell}) of the one Markdown table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header = cells[0]
    return header, [dict(zip(header, row)) for row in cells[2:]]


def test_smoke_mode_writes_every_row_and_column(tmp_path):
    out = tmp_path / "gpu_check.md"
    argv = ["--smoke", "--device", "cpu", "--num_workers", "0", "--out", str(out), "--work_dir", str(tmp_path / "w")]
    assert gpu_check.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert "Status: complete" in text and f"Command: `python bench/gpu_check.py {' '.join(argv)}`" in text
    assert f"torch {torch.__version__}" in text
    header, rows = table_rows(text)
    assert header == list(gpu_check.COLUMNS)
    # batch 1 and 2 × bf16 × checkpointing, compile, the full epoch.
    assert [(r["measurement"], r["batch"], r["bf16"], r["grad ckpt"], r["compile"]) for r in rows] == [
        *[("steps", str(b), bf16, ckpt, "off") for b in SMOKE.batch_sizes for bf16 in ("off", "on")
          for ckpt in ("off", "on")],
        ("compiled steps", "2", "on", "off", "on"), ("full epoch", "2", "off", "off", "off")]
    measured = [r for r in rows if r["bf16"] == "off" and r["compile"] == "off"]
    for row in measured:
        assert float(row["s/step"]) > 0 and float(row["crops/s"]) > 0, row
        assert row["data wait"].endswith("%") and row["peak memory"].endswith("GiB RSS"), row
    assert rows[-1]["steps"] == "2" and rows[-1]["epoch of 75 scans"].startswith("measured ")
    assert "validation" in rows[-1]["epoch of 75 scans"]
    for row in rows:
        if row["bf16"] == "on":  # bf16 and compile are GPU settings
            assert all(row[column] == NOT_ON_CPU for column in gpu_check.COLUMNS[5:]), row


def test_rows_not_reached_read_pending_and_the_status_says_incomplete():
    table, order = gpu_check.plan((1, 2, 8), gpu=True)
    assert order[0] == Setting("steps", 2, False, False) and order[4].kind == "epoch" and order[-1].compile
    assert sorted(order, key=table.index) == table
    context = {"mode": gpu_check.FULL, "device": torch.device("cpu"), "machine": "test machine",
               "started": time.perf_counter(), "budget_s": 420.0, "spacing": (0.45, 0.45, 5.0), "command": "cmd"}
    done = {"status": "done", "batch": 2, "amp": "bfloat16", "steps": 8, "s_per_step": 0.25, "crops_per_s": 8.0,
            "data_wait": 0.05, "peak_gpu_gib": 11.5, "gpu_total_gib": 79.1, "warmup_s": 4.0, "epoch_time_s": 2.0,
            "oom": False}
    text = gpu_check.render(context, table, {order[0]: done, order[1]: {"status": "skipped: time budget"}})
    assert "Status: incomplete: 2 of 14 rows reached" in text
    _, rows = table_rows(text)
    assert sum(r["s/step"] == PENDING for r in rows) == 12
    first = rows[table.index(order[0])]
    assert first["s/step"] == "0.250" and first["peak memory"] == "11.50 of 79.1 GiB GPU"
    assert rows[table.index(order[1])]["crops/s"] == "skipped: time budget"


def test_budget_estimates_come_from_the_rows_measured_so_far():
    row = {"s_per_step": 0.5, "wall_s": 30.0}
    results = {Setting("steps", 2, True, False): row}
    assert gpu_check.estimate_seconds(Setting("steps", 2, False, True), results, 75) == 30.0
    assert gpu_check.estimate_seconds(Setting("steps", 8, False, False), results, 75) == 0.0
    assert gpu_check.estimate_seconds(Setting("epoch", 2, True, False), results, 75) == 2 * 0.5 * 38
    assert gpu_check.estimate_seconds(Setting("steps", 2, True, False, compile=True), results, 75) == \
        gpu_check.COMPILE_ESTIMATE_S
