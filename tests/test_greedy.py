"""Greedy output equals model.generate(do_sample=False), token for token, across architectures and drafters."""

import pytest
import torch

import specdec
from specdec import heads, step
from models import ARCHS, PAD, perturbed, prompts, tiny

DRAFTERS = ["none", "draft_chain", "draft_tree", "prompt_lookup", "lookup_tree", "medusa", "eagle"]

EAGLE_TREE = (heads.Eagle._root_level, heads.Eagle._next_level, heads.Eagle._cut)


def make_drafter(kind, target):
    draft = perturbed(target)
    return {
        "none": None,
        "draft_chain": specdec.DraftModel(draft, num_draft_tokens=4),
        "draft_tree": specdec.DraftModel(draft, num_draft_tokens=3, tree_width=2),
        "prompt_lookup": specdec.PromptLookup(num_draft_tokens=4),
        "lookup_tree": specdec.PromptLookup(num_draft_tokens=3, max_ngram=2, tree_width=3),
        "medusa": heads.Medusa(heads.MedusaHeads(target, num_heads=3), top_k=(3, 2, 1)),
        "eagle": heads.Eagle(heads.EagleHead(target), top_k=3, depth=4, total_tokens=12),
    }[kind]


@pytest.fixture(scope="module", params=list(ARCHS))
def target(request):
    return tiny(request.param, attn="eager" if request.param.startswith("gemma") else "sdpa")


@pytest.mark.parametrize("batch,fast_path", [(1, None), (4, None), (4, True)],
                         ids=["batch1", "batch4", "batch4-fixed-shapes"])
@pytest.mark.parametrize("kind", DRAFTERS)
def test_greedy_equals_generate(target, kind, batch, fast_path):
    """``fast_path=True`` runs the step a CUDA graph captures (cache held at a fixed length), without graphs."""
    drafter = make_drafter(kind, target)
    for seed, width in [(0, 5), (1, 11)]:
        ids, mask = prompts(batch, width, seed)
        expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
        got = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=24,
                               fast_path=fast_path)
        assert torch.equal(got, expected), f"seed {seed} width {width}"


@pytest.mark.parametrize("arch,kinds", [("llama", ["none", "draft_tree", "lookup_tree", "medusa", "eagle"]),
                                        ("gemma2", ["lookup_tree"]), ("gpt2", ["lookup_tree"])])
def test_compiled_step_equals_generate(arch, kinds):
    """``compile=True``: the target's forward, and the draft model's or heads' passes, fused by Inductor inside
    the fixed-shape step (Medusa and EAGLE read features through a hook on the compiled model's LM head), on
    ragged rows. Every drafter on one architecture: each compiles for seconds on a CPU, once per batch size
    (static graphs; tests/test_session.py calls one model at three)."""
    target = tiny(arch, attn="eager" if arch.startswith("gemma") else "sdpa")
    ids, mask = prompts(3, 9, 1)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    for kind in kinds:
        got = specdec.generate(target, ids, attention_mask=mask, drafter=make_drafter(kind, target),
                               max_new_tokens=16, compile=True)
        assert torch.equal(got, expected), kind


@pytest.mark.parametrize("kind", ["draft_tree", "medusa", "eagle"])
def test_drafters_rank_the_vocabulary_in_slices(monkeypatch, kind):
    """With slices narrower than the tiny vocabulary, drafters take their children by the two-stage top-k
    (``sampling.top_k``), as they do over a real vocabulary: the same drafts (as many accepted) as with one
    ``torch.topk``, and ``generate``'s text."""
    from specdec import sampling

    target = tiny("llama")
    drafter = make_drafter(kind, target)
    ids, mask = prompts(3, 7, 4)
    run = lambda: specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=20,  # noqa: E731
                                   return_dict_in_generate=True, fast_path=True)
    whole = run()
    monkeypatch.setattr(sampling, "SLICE", 16)
    sliced = run()
    assert torch.equal(sliced.sequences, target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20))
    assert sliced.stats.accepted_tokens == whole.stats.accepted_tokens > 0


@pytest.mark.parametrize("kind,parts", [("draft_chain", lambda d: [d.model]), ("medusa", lambda d: [d.heads]),
                                        ("eagle", lambda d: [d.head.decoder, *EAGLE_TREE])])
def test_compile_fuses_the_drafters_own_passes(monkeypatch, kind, parts):
    """Under ``compile=True`` the draft model, the Medusa heads, and EAGLE's decoder and tree construction are
    compiled as the target is, and without it none is. ``torch.compile`` is only recorded here; the test above
    runs it."""
    target = tiny("llama")
    drafter = make_drafter(kind, target)
    ids, mask = prompts(2, 6, 0)
    step.compiled_keep_accepted()  # made once per process: not by the recorder below
    for compile in (False, True):
        compiled = []
        monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(fn) or fn)
        got = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=8, compile=compile,
                               fast_path=True)
        assert torch.equal(got, target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8))
        assert all((part in compiled) == compile for part in parts(drafter)) and (target in compiled) == compile


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_eos_mid_sequence_stops_each_row(arch):
    """Rows stop at their own eos (a token the target really emits), later rows keep going, pads follow."""
    model = tiny(arch, attn="eager")
    ids, mask = prompts(4, 7, seed=3)
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=None)
    eos = [int(free[0, 7 + 4]), int(free[2, 7 + 9])]
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=eos)
    assert expected.shape[1] < free.shape[1] or (expected == PAD).any(), "eos never fired: test is vacuous"
    for drafter in [specdec.DraftModel(model, num_draft_tokens=5), specdec.PromptLookup(3)]:
        got = specdec.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=20, eos_token_id=eos)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "qwen2"])
def test_sliding_window_really_cuts(arch):
    """Guards the sliding-window cases above from being vacuous: the window changes the output."""
    windowed = tiny(arch, attn="eager")
    wide = tiny(arch, attn="eager", sliding_window=4096)
    ids, mask = prompts(1, 9, seed=0)
    a = windowed.generate(ids, do_sample=False, max_new_tokens=30)
    b = wide.generate(ids, do_sample=False, max_new_tokens=30)
    assert not torch.equal(a, b)


def test_identical_draft_accepts_everything():
    model = tiny("llama")
    ids, _ = prompts(1, 6, seed=0)
    out = specdec.generate(model, ids, drafter=specdec.DraftModel(model, num_draft_tokens=5),
                           max_new_tokens=24, eos_token_id=None, return_dict_in_generate=True)
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.tau == 6.0
    assert out.stats.target_forwards == 1 + 4  # prefill, then 24 tokens in steps of 6


def test_eager_and_sdpa_agree():
    ids, mask = prompts(4, 9, seed=5)
    outs = []
    for attn in ["eager", "sdpa"]:
        model = tiny("qwen3", attn=attn)
        outs.append(specdec.generate(model, ids, attention_mask=mask, prompt_lookup_num_tokens=3, max_new_tokens=20))
    assert torch.equal(*outs)


@pytest.mark.parametrize("fast_path", [False, True])
def test_float64_model_equals_generate(fast_path):
    """The tree's float mask is built in the model's dtype: float64's minimum overflowed a float32 one."""
    model = tiny("mistral").double()
    ids, mask = prompts(2, 7, seed=6)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = specdec.generate(model, ids, attention_mask=mask, prompt_lookup_num_tokens=3, max_new_tokens=12,
                           do_sample=False, fast_path=fast_path)
    assert torch.equal(got, want)
