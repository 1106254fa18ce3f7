"""The embedded demo models, ``specdec bench`` and ``specdec demo``: what a fresh CPU-only install runs."""

from __future__ import annotations

import json

import pytest
import torch

import specdec
from specdec import bench, cli, embedded

BUDGET = 12_000_000  # bytes: the embedded default must stay small enough to ship inside the package


@pytest.fixture(scope="module")
def models():
    return embedded.load()


def test_embedded_default_fits_its_budget_and_holds_every_part(models):
    size = sum(f.stat().st_size for f in embedded.DEFAULT.rglob("*") if f.is_file())
    assert size <= BUDGET, f"the embedded models take {size:,} bytes, over the {BUDGET:,}-byte budget"
    assert not list(embedded.DEFAULT.rglob("checkpoint.pt"))
    assert models.draft is not None and models.medusa is not None and models.eagle is not None
    assert models.draft.num_parameters() < models.target.num_parameters()
    assert models.target.dtype == torch.float32  # saved smaller, loaded in fp32 for CPUs
    for kind in ("medusa", "eagle"):
        assert specdec.heads.load_head(getattr(models, kind), models.target).kind == kind
    prompts = models.prompts(3)
    assert len(set(prompts)) == 3 and all(p.lstrip().startswith(("def ", "async def ", "@")) for p in prompts)


def test_bench_runs_every_strategy_and_greedy_text_matches_generate(models):
    record = bench.measure(models, models.prompts(2), max_new_tokens=12, progress=False)
    names = [s.name for s in bench.strategies(models)]
    assert names == ["generate", "specdec, no drafter", "assisted: draft model", "assisted: prompt lookup",
                     "specdec: draft model", "specdec: prompt lookup", "specdec: medusa", "specdec: eagle"]
    rows = {(r["mode"], r["strategy"]): r for r in record["results"]}
    assert set(rows) == {(m, n) for m in ("greedy", "sample") for n in names}
    for (mode, name), r in rows.items():
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["target_forwards"] > 0
        assert r["same_text"] is (True if mode == "greedy" else None), (mode, name)
    assert rows["greedy", "generate"]["tau"] == 1.0 and rows["greedy", "generate"]["speedup"] == 1.0
    assert rows["greedy", "specdec: medusa"]["acceptance_rate"] is not None
    assert rows["greedy", "assisted: draft model"]["acceptance_rate"] is None  # transformers does not say
    assert set(record["summary"]) == {"greedy", "sample"}
    assert record["completions"]["greedy: specdec: eagle"] == record["completions"]["greedy: generate"]
    assert bench.table(record["results"]).count("\n") == len(record["results"]) + 1


def test_bench_counts_target_forwards_for_transformers_strategies_too(models):
    """τ is tokens per target forward, counted by a hook: plain generate makes one forward per token."""
    record = bench.measure(models, models.prompts(1), modes=("greedy",), max_new_tokens=10, progress=False,
                           only=["assisted: prompt lookup"])
    plain, lookup = record["results"]
    assert plain["target_forwards"] == plain["tokens"] == 10
    assert lookup["strategy"] == "assisted: prompt lookup" and lookup["target_forwards"] <= 10


def test_cli_bench_writes_a_record_with_how_to_reproduce_it(tmp_path, capsys):
    """A compiled strategy warms up on every prompt: prompts of new lengths recompile the target (automatic
    dynamic shapes), and a timed call must not include that (it did on the GPU, 2026-11-24: 0.25x)."""
    out = tmp_path / "bench.json"
    cli.main(["bench", "--prompts", "3", "--max-new-tokens", "8", "--modes", "greedy", "--compiled",
              "--only", "specdec: medusa, compiled", "--device", "cpu", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["command"].startswith("specdec bench --prompts 3")
    assert record["device"].startswith("cpu") and record["dtype"] == "float32" and record["versions"]["torch"]
    assert [r["strategy"] for r in record["results"]] == ["generate", "specdec: medusa, compiled"]
    assert record["results"][1]["same_text"] is True
    assert record["results"][1]["compiled_while_timed"] == 0
    assert "| greedy | specdec: medusa, compiled |" in capsys.readouterr().out


def test_cli_demo_shows_identical_text(capsys):
    cli.main(["demo", "--prompts", "1", "--max-new-tokens", "8"])
    assert "every strategy wrote the same text as model.generate: yes" in capsys.readouterr().out


def test_cli_refuses_bad_arguments_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--prompts", "0"])
    assert "--prompts 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="specdec: nonsense"):
        cli.main(["bench", "--prompts", "1", "--only", "specdec: nonsense", "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="--models"):
        cli.main(["bench", "--models", str(tmp_path), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="--medusa"):
        cli.main(["bench", "--medusa", str(tmp_path / "none"), "--device", "cpu"])


@pytest.mark.parametrize("command", ["train-heads", "pretrain"])
def test_cli_delegates_the_training_commands(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0 and "--out" in capsys.readouterr().out
