"""A model whose code does not honour the cache, positions or masks it is given is refused before anything is
generated, by the probe of specdec.guard, whatever its architecture."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import specdec
from models import Recorder, prompts, tiny
from specdec import guard


class ForgetsTheCache(LlamaForCausalLM):
    """Takes the cache and the mask, and uses neither: each pass sees only its own tokens."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                use_cache=None, **kwargs):
        return super().forward(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)


def _cache(past_key_values, cache) -> dict:
    """The cache under the name it came (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    if cache is not None:
        return {"cache": cache}
    return {} if past_key_values is None else {"past_key_values": past_key_values}


class NumbersByColumn(LlamaForCausalLM):
    """Drops the positions it is given and numbers tokens by cache column, as models with learned or ALiBi
    positions do: tree siblings and left-padded rows get other positions."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **_cache(past_key_values, cache),
                               **kwargs)


class RaisesOnTrees(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                **kwargs):
        if attention_mask is not None and not isinstance(attention_mask, dict) and attention_mask.dim() == 4:
            raise RuntimeError("no 4D masks here")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **_cache(past_key_values, cache), **kwargs)


def _as(model_class):
    model = model_class(tiny("llama").config).eval()
    model.load_state_dict(tiny("llama").state_dict())
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounding_is_not_a_mismatch_and_a_forgetful_model_still_is(models, dtype, monkeypatch):
    """Our masked pass and a plain one round differently in 16 bits (float16 by 6e-4 of the largest logit on the
    shipped target): the tolerance is the model's precision's, not the float32 it is compared in."""
    monkeypatch.setattr(guard, "_verdicts", {})
    guard.prove(copy.deepcopy(models.target).to(dtype), "model")
    with pytest.raises(NotImplementedError, match="differ from its own forward"):
        guard.prove(_as(ForgetsTheCache).to(dtype), "model")


@pytest.mark.parametrize("model_class,reason", [
    (ForgetsTheCache, "differ from its own forward"),
    (NumbersByColumn, "differ from its own forward"),
    (RaisesOnTrees, r"raised RuntimeError \(no 4D masks here\)"),
])
def test_a_model_that_ignores_what_it_is_given_is_refused_before_any_token(model_class, reason):
    model = _as(model_class)
    streamer = Recorder()
    with pytest.raises(NotImplementedError, match=rf"`model` \({model_class.__name__}\) cannot be verified.*{reason}"):
        specdec.generate(model, prompts(1, 6, 0)[0], max_new_tokens=4, prompt_lookup_num_tokens=3, streamer=streamer)
    assert streamer.chunks == []
    assert model.training is False


def test_a_draft_model_is_proven_too():
    with pytest.raises(NotImplementedError, match=r"`assistant_model` \(ForgetsTheCache\) cannot be verified"):
        specdec.generate(tiny("llama"), prompts(1, 6, 0)[0], assistant_model=_as(ForgetsTheCache), max_new_tokens=4)


def test_the_probe_runs_once_per_kind_of_model(monkeypatch):
    probes = []
    real = guard._probe
    monkeypatch.setattr(guard, "_verdicts", {})
    monkeypatch.setattr(guard, "_probe", lambda model: probes.append(type(model)) or real(model))
    ids = prompts(1, 6, 0)[0]
    for model in (tiny("llama"), tiny("llama", seed=1), tiny("llama").double(), tiny("qwen3")):
        specdec.generate(model, ids, max_new_tokens=3)
        specdec.generate(model, ids, max_new_tokens=3)
    assert len(probes) == 3  # the second llama differs only in its weights; float64 and Qwen3 are probed anew


def test_a_model_in_training_mode_is_probed_in_eval_mode_and_left_as_it_was(monkeypatch):
    monkeypatch.setattr(guard, "_verdicts", {})
    model = tiny("llama", attention_dropout=0.5).train()
    guard.prove(model, "model")
    assert model.training and all(module.training for module in model.modules())
