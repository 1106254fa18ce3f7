"""gpt-fast as a benchmark peer: its converted models compute transformers' logits and greedy tokens, and
loading it leaves the process as it was."""

from __future__ import annotations

import sys

import pytest
import torch
import torch._inductor.config as inductor_config

from models import tiny
from specdec import gpt_fast

N = 24


@pytest.fixture(scope="module")
def path(gpt_fast_path):
    return gpt_fast_path


@pytest.fixture(scope="module")
def peer(path, models):
    return gpt_fast.GptFast(path, models.target, models.draft, compile=False)


def prompt_ids(models, n):
    return [models.tokenizer(p, return_tensors="pt").input_ids for p in models.prompts(n)]


def test_converted_logits_equal_transformers(peer, models):
    ids = prompt_ids(models, 1)[0]
    with torch.no_grad():
        expected = models.target(ids).logits
    torch.testing.assert_close(peer.logits(ids), expected, rtol=1e-4, atol=1e-4)


def test_greedy_plain_and_speculative_equal_transformers(peer, models):
    for ids in prompt_ids(models, 2):
        # gpt-fast never stops at eos: transformers must not either, for the lengths to match.
        expected = models.target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=N, min_new_tokens=N)
        plain, plain_counts = peer.plain(ids, N)
        assert torch.equal(plain, expected)
        assert plain_counts == dict(target_forwards=N, drafted=0, accepted=0)
        speculative, counts = peer.speculative(ids, N)
        assert torch.equal(speculative, expected)
        steps = counts["target_forwards"] - 1
        assert counts["drafted"] == steps * peer.speculate_k
        assert 0 < counts["accepted"] <= counts["drafted"] and counts["target_forwards"] < N
        assert counts["accepted"] + steps + 1 >= N  # each step adds its accepted drafts and one token of its own


def test_refuses_batches_and_other_architectures(peer, models, path):
    ids = prompt_ids(models, 1)[0]
    with pytest.raises(ValueError, match="input_ids"):
        peer.plain(ids.repeat(2, 1), N)
    with pytest.raises(ValueError, match="input_ids"):
        peer.speculative(ids.repeat(2, 1), N)
    with pytest.raises(ValueError, match="max_new_tokens"):
        peer.speculative(ids, models.target.config.max_position_embeddings)
    refused = {"'gpt2', not 'llama'": tiny("gpt2"), "attention projections have biases": tiny(attention_bias=True),
               "head_dim 16": tiny(head_dim=16)}
    for reason, model in refused.items():
        with pytest.raises(ValueError, match=reason):
            gpt_fast.convert(model, path)


def test_loading_and_running_leave_the_process_settings_alone(path, models, monkeypatch):
    monkeypatch.setattr(gpt_fast, "_MODULES", {})  # import generate.py afresh, as in a new process
    keys = list(gpt_fast.INDUCTOR)
    with inductor_config.patch(coordinate_descent_tuning=False, fx_graph_cache=False):
        before = {k: inductor_config.get_config_copy()[k] for k in keys}
        modules, search_path = {k: sys.modules.get(k) for k in ("model", "tokenizer")}, list(sys.path)
        peer = gpt_fast.GptFast(path, models.target, compile=False)
        peer.plain(prompt_ids(models, 1)[0][:, :16], 4)
        assert {k: inductor_config.get_config_copy()[k] for k in keys} == before
        assert inductor_config.coordinate_descent_tuning is False
        assert {k: sys.modules.get(k) for k in ("model", "tokenizer")} == modules and sys.path == search_path
    with pytest.raises(RuntimeError, match="token ids"):
        peer.generate_module.get_tokenizer("tokenizer.model", "model.pth")


def test_bench_times_gpt_fast_beside_ours_with_the_same_text(models, path):
    from specdec import bench

    record = bench.measure(models, models.prompts(2), modes=("greedy",), max_new_tokens=16, progress=False,
                           peers={"gpt-fast": path}, only=["gpt-fast: speculative"])
    rows = {r["strategy"]: r for r in record["results"]}
    assert set(rows) == {"generate", "generate, static cache", "gpt-fast: plain", "gpt-fast: speculative",
                         "specdec, no drafter"}
    assert rows["gpt-fast: plain"]["family"] == bench.BASELINE and rows["gpt-fast: plain"]["tau"] == 1.0
    speculative = rows["gpt-fast: speculative"]
    assert speculative["same_text"] and rows["gpt-fast: plain"]["same_text"]
    assert speculative["tau"] > 1 and 0 < speculative["acceptance_rate"] <= 1


def test_a_conversion_that_computes_another_function_is_refused_before_timing(models, peer):
    ids = models.tokenizer(models.prompts(1), return_tensors="pt").input_ids
    assert peer.check(models.target, ids) < 1e-4
    with torch.no_grad():
        peer.target.layers[0].attention.wqkv.weight[:8].neg_()  # a wrong RoPE permutation would look like this
    try:
        with pytest.raises(ValueError, match="conversion does not fit"):
            peer.check(models.target, ids)
    finally:
        with torch.no_grad():
            peer.target.layers[0].attention.wqkv.weight[:8].neg_()
