"""The embedded demo models, ``specdec bench`` and ``specdec demo``: what a fresh CPU-only install runs."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import specdec
from specdec import bench, cli, embedded
from specdec import session as sessions

BUDGET = 12_000_000  # bytes: the embedded default must stay small enough to ship inside the package


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
    assert names == ["generate", "generate, static cache", "specdec, no drafter", "assisted: draft model",
                     "assisted: prompt lookup", "specdec: draft model", "specdec: prompt lookup", "specdec: medusa",
                     "specdec: eagle"]
    rows = {(r["mode"], r["strategy"]): r for r in record["results"]}
    assert set(rows) == {(m, n) for m in ("greedy", "sample") for n in names}
    for (mode, name), r in rows.items():
        assert r["batch"] == 1 and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert r["same_text"] is (True if mode == "greedy" else None), (mode, name)
    assert rows["greedy", "generate"]["tau"] == 1.0 and rows["greedy", "generate"]["target_forwards"] is None
    assert rows["greedy", "specdec: medusa"]["acceptance_rate"] is not None
    assert rows["greedy", "assisted: draft model"]["acceptance_rate"] is None  # transformers does not say
    assert set(record["summary"]) == {"greedy, batch 1", "sample, batch 1"}
    assert record["completions"]["greedy, batch 1: specdec: eagle"] == record["completions"]["greedy, batch 1: generate"]
    assert bench.table(record["results"]).count("\n") == len(record["results"]) + 1


def test_bench_auto_runs_each_drafter_under_auto_beside_it(models):
    record = bench.measure(models, models.prompts(1), max_new_tokens=8, modes=["greedy"], auto=True, progress=False,
                           only=["specdec: prompt lookup", "specdec: prompt lookup, auto"])
    rows = {r["strategy"]: r for r in record["results"]}
    assert {"specdec: prompt lookup", "specdec: prompt lookup, auto"} <= set(rows)
    assert rows["specdec: prompt lookup, auto"]["same_text"] is True
    assert rows["specdec: prompt lookup"]["plain_share"] == 0 and rows["specdec, no drafter"]["plain_share"] == 1
    assert 0 <= rows["specdec: prompt lookup, auto"]["plain_share"] <= 1


def test_bench_names_the_costs_auto_measured_per_mode(models, monkeypatch):
    from specdec import adaptive

    monkeypatch.setattr(adaptive, "ROUND_STEPS", 2)
    x = models.tokenizer(models.prompts(1), return_tensors="pt")
    specdec.generate(models.target, **x, prompt_lookup_num_tokens=10, max_new_tokens=40, fast_path=True,
                     speculation="auto")
    costs = bench._mode_costs(models.target)
    assert set(costs) == {"plain", "PromptLookup(10, 3, 1, 1)", "PromptLookup(5, 3, 1, 1)"}
    assert all(ms > 0 for ms in costs.values())
    specdec.release(models.target)
    assert bench._mode_costs(models.target) is None


def test_bench_speedups_are_against_the_fastest_baseline_and_our_no_drafter_path(models):
    record = bench.measure(models, models.prompts(2), modes=("greedy",), max_new_tokens=8, progress=False,
                           only=["specdec: prompt lookup"])
    rows = {r["strategy"]: r for r in record["results"]}
    fastest = max(rows["generate"]["tokens_per_s"], rows["generate, static cache"]["tokens_per_s"])
    lookup = rows["specdec: prompt lookup"]
    assert lookup["x_fastest_baseline"] == pytest.approx(lookup["tokens_per_s"] / fastest, rel=1e-2)
    assert lookup["fastest_baseline"] in ("generate", "generate, static cache")
    assert lookup["x_no_drafter"] == pytest.approx(
        lookup["tokens_per_s"] / rows["specdec, no drafter"]["tokens_per_s"], rel=1e-2)
    summary = record["summary"]["greedy, batch 1"]
    assert summary["best_ours"] == "specdec: prompt lookup" and summary["x_no_drafter"] == lookup["x_no_drafter"]


def eos_early(models) -> int:
    """A token that ends some of the 4 prompts' greedy completions within 24 tokens, and not all at once."""
    x = models.tokenizer(models.prompts(4), return_tensors="pt", padding=True)
    out = models.target.generate(**x, do_sample=False, max_new_tokens=24)[:, x["input_ids"].shape[1]:]
    first = [{t: i for i, t in reversed(list(enumerate(row)))} for row in out.tolist()]
    return next(t for t in first[0] if len({f.get(t, 99) for f in first}) > 1)


def test_bench_batches_ragged_prompts_and_leaves_batch_one_strategies_out(models):
    """Rows of different lengths share a batch, each row is checked against eager generate's, and transformers'
    assisted generation (batch 1 only) is left out of batch 2."""
    record = bench.measure(models, models.prompts(4), modes=("greedy",), batch_sizes=(1, 2), calls=2,
                           max_new_tokens=8, progress=False)
    by_batch = {b: [r for r in record["results"] if r["batch"] == b] for b in (1, 2)}
    assert {r["rows"] for r in by_batch[1]} == {2} and {r["rows"] for r in by_batch[2]} == {4}
    assert not any(r["strategy"].startswith("assisted") for r in by_batch[2])
    assert all(r["same_text"] for r in record["results"]), [r["strategy"] for r in record["results"] if not r["same_text"]]
    assert {r["agreement"] for r in record["results"]} == {1.0}
    assert len(record["completions"]["greedy, batch 2: specdec: eagle"]) == 4
    with pytest.raises(ValueError, match="batch_sizes"):
        bench.measure(models, models.prompts(2), batch_sizes=(4,), progress=False)


def test_bench_times_no_call_that_outgrows_the_kept_session(models, monkeypatch):
    """Our strategies warm up on every batch. Warmed on the first alone, a later, longer prompt outgrew the
    session kept on the target in a timed call, which captured its steps (and "auto" measured its costs) anew."""
    monkeypatch.setattr(sessions, "ROUND", 1)  # sessions sized exactly: any longer prompt outgrows them
    monkeypatch.setattr(bench, "generate", functools.partial(specdec.generate, fast_path=True))  # as on a GPU
    tok = models.tokenizer
    prompts = sorted(models.prompts(2), key=lambda p: len(tok(p).input_ids))
    assert len(tok(prompts[0]).input_ids) < len(tok(prompts[1]).input_ids)
    seen, sync = set(), bench._sync

    def timing(device):
        session = sessions._sessions.get(models.target)
        if session is not None:
            seen.add(id(session))
        return sync(device)

    monkeypatch.setattr(bench, "_sync", timing)
    bench.measure(models, prompts, modes=("greedy",), calls=2, max_new_tokens=4, progress=False, only=[])
    assert len(seen) == 1


def test_bench_tau_counts_the_rows_still_generating(models, monkeypatch):
    """Our loop with no drafter gains one token per step per row: rows of a batch that stopped early at eos
    pulled its τ below 1 (0.38 at batch 4 on the GPU)."""
    monkeypatch.setattr(models.target.generation_config, "eos_token_id", eos_early(models))
    record = bench.measure(models, models.prompts(4), modes=("greedy",), batch_sizes=(4,), calls=1,
                           max_new_tokens=24, progress=False, only=[])
    rows = {r["strategy"]: r for r in record["results"]}
    assert rows[bench.NO_DRAFTER]["tokens"] < 4 * 24  # some rows did stop early
    assert rows[bench.NO_DRAFTER]["tau"] == 1.0


def test_agreement_is_the_share_of_reference_tokens_before_rows_part():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
    assert bench._agreement(reference, reference) == 1.0
    assert bench._agreement([[1, 2, 0, 4], [5, 6, 7, 8, 9, 10, 11]], reference) == 0.8
    assert bench._same([[1, 2, 3, 4, 2], [5, 6, 7, 8, 9, 10]], reference)  # gpt-fast runs on past eos
    assert not bench._same([[1, 2, 0, 4], [5, 6, 7, 8, 9, 10]], reference)


def test_bench_counts_target_forwards_for_transformers_strategies_too(models):
    """τ is tokens per target forward, counted by a hook for transformers' assisted generation."""
    record = bench.measure(models, models.prompts(1), modes=("greedy",), max_new_tokens=10, progress=False,
                           only=["assisted: prompt lookup"])
    lookup = record["results"][-1]
    assert lookup["strategy"] == "assisted: prompt lookup" and 0 < lookup["target_forwards"] <= 10
    assert lookup["tau"] == pytest.approx(lookup["tokens"] / lookup["target_forwards"], rel=1e-3)


def test_cli_bench_writes_a_record_with_how_to_reproduce_it(tmp_path, capsys):
    """A compiled strategy warms up on every prompt: prompts of new lengths recompile the target (automatic
    dynamic shapes), and a timed call must not include that (it did on the GPU, 2026-11-24: 0.25x)."""
    out = tmp_path / "bench.json"
    cli.main(["bench", "--prompts", "4", "--prompts-from", str(embedded.DEFAULT.parent), "--max-new-tokens", "8",
              "--modes", "greedy", "--compiled", "--only", "specdec: medusa, compiled", "--device", "cpu",
              "--calls", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["command"].startswith("specdec bench --prompts 4")
    assert record["device"].startswith("cpu") and record["dtype"] == "float32" and record["versions"]["torch"]
    assert [r["strategy"] for r in record["results"]] == ["generate", "generate, static cache",
                                                          "specdec, no drafter", "specdec: medusa, compiled"]
    assert record["results"][3]["same_text"] is True and record["results"][3]["rows"] == 3
    assert record["results"][3]["compiled_while_timed"] == 0
    assert len(record["prompt_sources"]) == 2 and "def " in record["prompts"][1]
    assert "| greedy | 1 | specdec: medusa, compiled |" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith("| mode | batch | strategy |")


def test_cli_demo_shows_identical_text_and_how_it_timed(capsys):
    cli.main(["demo", "--prompts", "1", "--max-new-tokens", "8", "--repeats", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "every strategy wrote the same text as model.generate: yes" in out
    assert "completion" in out and "\033[" not in out  # the prompt's end is marked without colour codes
    assert "τ: new tokens per target forward" in out and "the median of 2 calls per prompt, torch on 1 threads" in out


def test_cli_refuses_bad_arguments_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--prompts", "0"])
    assert "--prompts 0" in capsys.readouterr().err
    for argv, message in [(["--only", "specdec: nonsense"], "specdec: nonsense"),
                          (["--models", str(tmp_path)], "--models"),
                          (["--medusa", str(tmp_path / "none")], "--medusa"),
                          (["--peer", "gpt-fast"], "NAME=PATH"),
                          (["--peer", "vllm=x"], "peers known"),
                          (["--shape", "llama-9"], "--shape 'llama-9'"),
                          (["--batch-sizes", "2"], "batch_sizes")]:
        with pytest.raises(SystemExit):
            cli.main(["bench", "--prompts", "1", "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["train-heads", "pretrain"])
def test_cli_delegates_the_training_commands(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0 and "--out" in capsys.readouterr().out


def test_embedded_models_offer_ready_drafters_and_a_path_is_not_one(models):
    drafters = models.drafters()
    assert list(drafters) == ["draft model", "prompt lookup", "medusa", "eagle"]
    x = models.tokenizer(models.prompts(1), return_tensors="pt")
    expected = models.target.generate(**x, do_sample=False, max_new_tokens=8)
    assert torch.equal(specdec.generate(models.target, **x, drafter=drafters["eagle"], max_new_tokens=8), expected)
    with pytest.raises(TypeError, match=r"specdec.heads.load\(path, model\)"):
        specdec.generate(models.target, **x, drafter=models.medusa, max_new_tokens=8)
