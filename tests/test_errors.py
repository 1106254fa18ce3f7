"""Bad input is refused with an error naming the argument, before anything runs or changes."""

import pytest
import torch
from transformers import DynamicCache, LlamaModel, StaticCache

import specdec
from specdec.forward import cache_keyword
from models import perturbed, prompts, tiny


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


def test_draft_with_other_vocabulary(model):
    draft = tiny("llama", vocab_size=128)
    with pytest.raises(ValueError, match="assistant_model.*vocabulary"):
        specdec.generate(model, prompts(1, 5, 0)[0], assistant_model=draft, max_new_tokens=4)


def test_batch_without_pad_token():
    model = tiny("llama")
    model.generation_config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        specdec.generate(model, prompts(2, 5, 0, ragged=False)[0], max_new_tokens=4)


@pytest.mark.parametrize("make", [
    lambda m: specdec.generate(m, prompts(1, 5, 0)[0], max_new_tokens=0),
    lambda m: specdec.generate(m, prompts(1, 5, 0)[0], max_new_tokens=-3),
    lambda m: specdec.generate(m, prompts(1, 5, 0)[0], prompt_lookup_num_tokens=0),
    lambda m: specdec.DraftModel(m, num_draft_tokens=0),
    lambda m: specdec.DraftModel(m, tree_width=-1),
    lambda m: specdec.PromptLookup(num_draft_tokens=0),
], ids=["max_new_tokens=0", "max_new_tokens<0", "prompt_lookup=0", "num_draft_tokens=0", "tree_width<0", "lookup_tokens=0"])
def test_non_positive_counts(model, make):
    with pytest.raises(ValueError, match="must be (positive|greater than 0)"):
        make(model)


def test_not_a_causal_lm(model):
    with pytest.raises(TypeError, match="`model` must be a decoder-only causal LM"):
        specdec.generate(LlamaModel(model.config), prompts(1, 5, 0)[0], max_new_tokens=4)
    with pytest.raises(TypeError, match="assistant_model"):
        specdec.DraftModel(LlamaModel(model.config))


def test_unsupported_cache(model):
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(TypeError, match="past_key_values.*StaticCache"):
        specdec.generate(model, prompts(1, 5, 0)[0], past_key_values=cache, max_new_tokens=4)


def test_unsupported_generation_option(model):
    with pytest.raises(ValueError, match="num_beams"):
        specdec.generate(model, prompts(1, 5, 0)[0], num_beams=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="repetition_penalty"):
        specdec.generate(model, prompts(1, 5, 0)[0], repetition_penalty=1.2, max_new_tokens=4)


def test_unknown_keyword(model):
    with pytest.raises(TypeError, match="bogus_option"):
        specdec.generate(model, prompts(1, 5, 0)[0], bogus_option=3, max_new_tokens=4)


def test_right_padding_refused(model):
    ids, mask = prompts(2, 6, 0, ragged=False)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        specdec.generate(model, ids, attention_mask=mask, max_new_tokens=4)


def test_attention_without_mask_support_refused():
    model = tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        specdec.generate(model, prompts(1, 5, 0)[0], max_new_tokens=4)


def test_several_drafters_refused(model):
    with pytest.raises(ValueError, match="at most one"):
        specdec.generate(model, prompts(1, 5, 0)[0], assistant_model=model, prompt_lookup_num_tokens=3)


def test_error_mid_generation_leaves_model_and_cache_usable(model):
    """A streamer that raises mid-way aborts the call; the caller's cache and model are unchanged."""
    ids, _ = prompts(1, 9, 0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :6], **{cache_keyword(model): cache})
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    class Exploding:
        calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")

        def end(self):
            pass

    draft = perturbed(model)
    with pytest.raises(RuntimeError, match="boom"):
        specdec.generate(model, ids, past_key_values=cache, assistant_model=draft, streamer=Exploding(), max_new_tokens=20)
    for layer, (k, v) in zip(cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    expected = model.generate(ids, do_sample=False, max_new_tokens=20)
    assert torch.equal(specdec.generate(model, ids, past_key_values=cache, assistant_model=draft, max_new_tokens=20), expected)


@pytest.mark.parametrize("options,match", [
    (dict(fast_path="yes"), "`fast_path` must be None, True or False"),
    (dict(compile="yes"), "`compile` must be True or False"),
    (dict(compile=True, fast_path=False), "`compile=True`.*`fast_path=False`"),
    (dict(speculation="sometimes"), "`speculation` must be 'auto' or 'always'"),
])
def test_path_options(model, options, match):
    with pytest.raises(ValueError, match=match):
        specdec.generate(model, prompts(1, 5, 0)[0], max_new_tokens=4, **options)


def test_int32_ids_are_taken_as_transformers_takes_them(model):
    ids = prompts(1, 7, 0)[0]
    expected = model.generate(ids, do_sample=False, max_new_tokens=6)
    assert torch.equal(specdec.generate(model, ids.int(), prompt_lookup_num_tokens=3, max_new_tokens=6), expected)
    with pytest.raises(ValueError, match="integer tensor"):
        specdec.generate(model, ids.float(), max_new_tokens=6)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_length=5), ValueError, "`max_length` 5 leaves no room after the prompt's 7 tokens"),
    (dict(max_new_tokens=6.0), TypeError, "`max_new_tokens` must be an int, got 6.0"),
    (dict(max_new_tokens=6, eos_token_id=500), ValueError, r"`eos_token_id` \[500\] is outside the model's vocabulary"),
])
def test_lengths_and_eos_are_refused_by_the_name_given(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        specdec.generate(model, prompts(1, 7, 0)[0], **kwargs)


def test_generating_past_the_position_limit_warns(model):
    with pytest.warns(UserWarning, match="max_position_embeddings=256"):
        specdec.generate(model, prompts(1, 250, 0)[0], max_new_tokens=10)


def test_wrap_refuses_a_model_as_drafter_as_generate_does(model):
    with pytest.raises(TypeError, match=r"specdec.DraftModel\(model\) or assistant_model=model"):
        specdec.wrap(model, drafter=tiny("llama", seed=1))
