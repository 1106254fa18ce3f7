"""Every decoder-only causal LM in the installed transformers gives exactly its own greedy text, or is refused
before anything runs: never a crash, never different text (architectures.py builds each one tiny)."""

from __future__ import annotations

import pytest
import torch

import specdec
from architectures import build, decoder_only
from models import EOS, perturbed, prompts

NEW_TOKENS = 10


def _text(new_tokens: torch.Tensor) -> list[int]:
    """A row's new tokens up to its first eos, which ends it (a batch pads what follows)."""
    tokens = new_tokens.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _own_texts(model, ids, mask) -> list[list[int]]:
    """Each row as the model's own greedy ``generate`` writes it alone, unpadded: the ground truth, also for a
    model whose own batched ``generate`` mishandles left padding (GIT) or fails on it (Dory)."""
    texts = []
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()][None]
        texts.append(_text(model.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)[0, prompt.shape[1]:]))
    return texts


@pytest.mark.parametrize("model_type", decoder_only())
def test_exact_or_refused_before_anything_runs(model_type):
    try:
        model = build(model_type)
    except Exception as error:
        pytest.skip(f"no tiny {model_type} could be built here: {type(error).__name__}: {error}")
    ids, mask = prompts(3, 8, seed=8)  # rows of 8, 5 and 3 tokens
    calls = {
        "draft chain": lambda: dict(assistant_model=perturbed(model, scale=0.01)),
        "draft tree, fixed shapes": lambda: dict(
            drafter=specdec.DraftModel(perturbed(model, scale=0.01), num_draft_tokens=3, tree_width=2),
            fast_path=True),
        "prompt lookup tree": lambda: dict(drafter=specdec.PromptLookup(num_draft_tokens=3, tree_width=2)),
    }
    expected = None
    for name, arguments in calls.items():
        try:
            out = specdec.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                   return_dict_in_generate=True, **arguments())
        except NotImplementedError as refusal:
            assert name == "draft chain", f"refused only at {name}: {refusal}"
            assert str(refusal).startswith(("`model`", "`assistant_model`")), refusal
            return
        expected = expected or _own_texts(model, ids, mask)
        got = [_text(out.sequences[row, ids.shape[1]:]) for row in range(ids.shape[0])]
        assert got == expected, f"{model_type}, {name}: different text"
        if name == "draft chain":
            assert out.stats.accepted_tokens > 0, "the draft got nothing accepted: the test would prove little"


def test_a_config_with_per_layer_head_sizes_runs_exactly():
    """Gemma 4 sizes attention heads per layer and refuses a global ``config.head_dim``; reading it once made
    every call on it fail in our forward pass."""
    model = build("gemma4_text")
    ids, mask = prompts(3, 8, seed=8)  # rows of 8, 5 and 3 tokens
    out = specdec.generate(model, ids, attention_mask=mask, assistant_model=perturbed(model, scale=0.01),
                           max_new_tokens=NEW_TOKENS)
    assert [_text(out[row, ids.shape[1]:]) for row in range(3)] == _own_texts(model, ids, mask)


def test_a_model_whose_cache_is_not_a_kv_cache_is_refused_naming_it():
    """Reformer is a causal LM with a masked-LM head too, so the list above leaves it out; its hashed buckets are
    not a cache a rejected draft can be cropped from."""
    with pytest.raises(NotImplementedError, match=r"\(ReformerModelWithLMHead\) takes no KV cache: .*past_buckets"):
        specdec.generate(build("reformer"), torch.tensor([[5, 6, 7]]), max_new_tokens=3)


def test_a_model_without_attention_sizes_in_its_config_is_refused_saying_so():
    """BLT keeps its sizes in sub-configs: the probe's refusal blamed BLT's forward for specdec's own read of
    its head size."""
    with pytest.raises(NotImplementedError, match=r"\(BltForCausalLM\) gives no attention sizes in its own config"):
        specdec.generate(build("blt"), torch.tensor([[5, 6, 7]]), max_new_tokens=3)
