"""The GPU benchmarks' code paths, run small on a CPU so that they do not rot between GPU sessions."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_verify_step_benchmark_times_every_row(tmp_path):
    main = runpy.run_path(str(BENCHMARKS / "verify_step.py"))["main"]
    out = tmp_path / "verify.json"
    main(["--tiny", "--P", "32", "64", "--T", "1", "8", "--steps", "2", "--warmup", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["P"], r["T"]) for r in rows] == [(32, 1), (32, 8), (64, 1), (64, 8)]
    timed = ("step_ms", "graph_ms", "compiled_ms", "compiled_pipelined_ms", "forward_ms", "plain_decode_ms")
    assert all(r[name] > 0 for r in rows for name in timed)
    assert rows[2]["kv_bytes"] == 2 * rows[0]["kv_bytes"]
    assert rows[0]["unread_embedding_bytes"] == 256 * 64 * 4  # the tiny model's untied fp32 input table


def test_split_sweep_restores_the_kernels_split(tmp_path):
    """Each setting is timed in both rounds, and the kernel's own split comes back afterwards."""
    run = runpy.run_path(str(BENCHMARKS / "verify_step.py"))
    kernel = run["tree_kernel"]
    default = (kernel.WAVES, kernel.MIN_CHUNK)
    out = tmp_path / "split.json"
    run["main"](["--tiny", "--P", "32", "--T", "4", "--steps", "2", "--warmup", "1", "--split", "4:512", "1:64",
                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["WAVES"], r["MIN_CHUNK"], r["repeat"]) for r in rows] == [(4, 512, 0), (1, 64, 0), (1, 64, 1), (4, 512, 1)]
    assert all(r["compiled_ms"] > 0 and r["compiled_pipelined_ms"] > 0 for r in rows)
    assert (kernel.WAVES, kernel.MIN_CHUNK) == default
