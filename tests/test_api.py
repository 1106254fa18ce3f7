"""The drop-in surface: transformers' keyword arguments, return types, streamer, wrap()."""

import warnings

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import specdec
from specdec.forward import cache_keyword
from models import Recorder, perturbed, prompts, tiny


def test_return_dict_carries_sequences_and_stats():
    model = tiny("llama")
    ids, mask = prompts(2, 6, 0)
    out = specdec.generate(model, ids, attention_mask=mask, prompt_lookup_num_tokens=3, max_new_tokens=12,
                           eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None))
    s = out.stats
    assert s.new_tokens == 2 * 12
    assert s.target_forwards == s.steps + 1
    assert s.tau == (s.accepted_tokens + s.row_steps) / s.row_steps >= 1.0
    assert 0.0 <= s.acceptance_rate <= 1.0 and s.verify_seconds > 0


def test_generation_config_and_min_new_tokens_and_max_length():
    model = tiny("qwen2")
    ids, mask = prompts(3, 6, 1)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 7])  # the second generated token of row 0
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=5, eos_token_id=[eos, 2], pad_token_id=0)
    expected = model.generate(ids, attention_mask=mask, generation_config=config)
    got = specdec.generate(model, ids, attention_mask=mask, generation_config=config,
                           drafter=specdec.DraftModel(perturbed(model), 3))
    assert torch.equal(got, expected)
    # No max_new_tokens: transformers' max_length default (20 tokens in all) applies.
    assert torch.equal(specdec.generate(model, ids, attention_mask=mask), model.generate(ids, attention_mask=mask))


def test_streamer_receives_prompt_then_every_new_token_in_order():
    model = tiny("llama")
    ids, _ = prompts(1, 6, 2)

    streamer = Recorder()
    out = specdec.generate(model, ids, assistant_model=model, max_new_tokens=15, streamer=streamer, eos_token_id=None)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == out[0, 6:].tolist()
    assert max(len(c) for c in streamer.chunks[1:]) > 1  # several tokens per step arrive together


def test_wrap_behaves_like_the_model():
    model = tiny("phi3")
    fast = specdec.wrap(model, drafter=specdec.PromptLookup(3))
    ids, mask = prompts(2, 7, 3)
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=10),
                       model.generate(ids, attention_mask=mask, max_new_tokens=10))
    assert fast.config is model.config
    assert torch.equal(fast(ids).logits, model(ids).logits)


def test_pad_inferred_from_input_ids_when_no_mask():
    model = tiny("mistral")
    ids, mask = prompts(3, 8, 4)
    assert torch.equal(specdec.generate(model, ids, max_new_tokens=10),
                       model.generate(ids, attention_mask=mask, max_new_tokens=10))


def test_one_token_prompt():
    model = tiny("gpt2")
    ids = torch.tensor([[7]])
    assert torch.equal(specdec.generate(model, ids, prompt_lookup_num_tokens=2, max_new_tokens=8),
                       model.generate(ids, max_new_tokens=8))


def test_stats_add_pools_counters_so_tau_is_the_pooled_one():
    a = specdec.Stats(target_forwards=3, steps=2, row_steps=2, drafted_tokens=8, accepted_tokens=6, new_tokens=8)
    b = specdec.Stats(target_forwards=5, steps=4, row_steps=4, drafted_tokens=16, accepted_tokens=0, new_tokens=4)
    total = sum([a, b], specdec.Stats())
    assert total.target_forwards == 8 and total.new_tokens == 12
    assert total.tau == (6 + 6) / 6 and total.acceptance_rate == 6 / 24


def test_no_drafter_costs_one_target_forward_per_token_as_generate_does():
    """The prompt's pass yields the first token, as in plain decoding (it used to cost one pass more: the
    prompt's last token waited for the first tree)."""
    model = tiny("llama")
    ids, _ = prompts(1, 6, 0)
    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        res = specdec.generate(model, ids, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True)
        ours = len(calls)
        calls.clear()
        model.generate(ids, max_new_tokens=10, eos_token_id=None)
    finally:
        hook.remove()
    assert ours == len(calls) == res.stats.target_forwards == 10
    assert res.stats.steps == 9 and res.stats.new_tokens == 10


def test_the_cache_goes_under_the_name_the_installed_transformers_takes():
    """transformers 5.2x warns on `past_key_values=` and 5.40 drops it for `cache=`; 5.17 knows only the
    old name. Before, every step passed `past_key_values=` and 5.24 warned on each forward."""
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values"
    model, draft = tiny(), tiny(seed=1, num_hidden_layers=1)
    assert cache_keyword(torch.compile(model)) == cache_keyword(model)
    ids = prompts(1, 9, 0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = specdec.generate(model, ids, assistant_model=draft, max_new_tokens=6)
    prefix = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :5], **{cache_keyword(model): prefix})
    assert torch.equal(specdec.generate(model, ids, cache=prefix, max_new_tokens=6), out)
    with pytest.raises(ValueError, match="not both"):
        specdec.generate(model, ids, cache=prefix, past_key_values=prefix, max_new_tokens=6)


def test_stats_print_tau_and_acceptance():
    stats = specdec.output.Stats(steps=4, row_steps=4, drafted_tokens=10, accepted_tokens=6, new_tokens=10)
    assert str(stats).startswith("τ 2.50 tokens per step, acceptance 0.60 (6/10 drafted)")
