"""The GPU benchmarks' code paths, run small on a CPU so that they do not rot between GPU sessions."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_verify_step_benchmark_times_every_row(tmp_path):
    main = runpy.run_path(str(BENCHMARKS / "verify_step.py"))["main"]
    out = tmp_path / "verify.json"
    main(["--tiny", "--B", "1", "3", "--P", "32", "64", "--T", "8", "--steps", "2", "--warmup", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["B"], r["P"], r["T"]) for r in rows] == [(1, 32, 8), (1, 64, 8), (3, 32, 8), (3, 64, 8)]
    timed = ("step_ms", "graph_ms", "compiled_ms", "compiled_pipelined_ms", "forward_ms", "plain_decode_ms")
    assert all(r[name] > 0 for r in rows for name in timed)
    assert rows[1]["kv_bytes"] == 2 * rows[0]["kv_bytes"] and rows[2]["kv_bytes"] == 3 * rows[0]["kv_bytes"]
    assert rows[0]["unread_embedding_bytes"] == 256 * 64 * 4  # the tiny model's untied fp32 input table


def test_compare_alternates_settings_and_restores_them(tmp_path):
    """Each setting is timed in both rounds, in alternating order, and the kernel's split and the model's
    projections are as they were afterwards."""
    run = runpy.run_path(str(BENCHMARKS / "verify_step.py"))
    kernel = run["tree_kernel"]
    default = (kernel.WAVES, kernel.MIN_CHUNK)
    out = tmp_path / "compare.json"
    run["main"](["--tiny", "--P", "32", "--T", "4", "--steps", "2", "--warmup", "1", "--compare", "split=4:512",
                 "fuse=off", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["setting"], r["repeat"]) for r in rows] == [("split=4:512", 0), ("fuse=off", 0), ("fuse=off", 1),
                                                           ("split=4:512", 1)]
    assert all(r["compiled_ms"] > 0 and r["compiled_pipelined_ms"] > 0 for r in rows)
    assert (kernel.WAVES, kernel.MIN_CHUNK) == default
    with pytest.raises(ValueError, match="unknown setting"):
        run["main"](["--tiny", "--P", "32", "--T", "4", "--compare", "fuse=maybe"])
