"""What ``generate`` keeps of a model between calls on the fixed-shape path (``specdec.session``): later calls
start from a clean state in the same buffers, so steps captured in an earlier call can replay in them. On a
CPU there are no graphs; ``fast_path=True`` runs the same buffers and recipes (tests/test_cuda.py replays)."""

import gc

import pytest
import torch

import specdec
from specdec import session as sessions
from models import PAD, perturbed, prompts, tiny
from test_greedy import make_drafter

KINDS = ["none", "draft_tree", "lookup_tree", "medusa", "eagle"]


def buffers(model):
    """Every buffer of ``model``'s kept session: its own and its drafters' kept state."""
    kept = sessions._sessions[model]
    drafted = [x for k in kept.kept.values() for x in [*(k.cache.tensors() if k.cache else ()),
                                                        *(t for v in k.tensors.values() for t in v)]]
    return [x.data_ptr() for x in [kept.seqs.tokens, kept.counters, *kept.cache.tensors(), *drafted]]


@pytest.mark.parametrize("kind", KINDS)
def test_later_calls_reuse_the_buffers_and_start_clean(kind):
    """Prompts of other widths and lengths in the same buffers (the drafter's too), each as ``generate`` gives
    it; the same call again counts the same statistics (nothing carried over), under one recipe."""
    target = tiny("llama")
    drafter = make_drafter(kind, target)
    calls = [(2, 5, 24, 0), (2, 11, 16, 1), (2, 7, 30, 2), (2, 5, 24, 0)]
    stats, kept = [], []
    for batch, width, new, seed in calls:
        ids, mask = prompts(batch, width, seed)
        out = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=new,
                               fast_path=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new))
        stats.append((out.stats.steps, out.stats.accepted_tokens, out.stats.new_tokens, out.stats.draft_forwards))
        kept.append(buffers(target))
    assert stats[0] == stats[-1]
    assert all(k == kept[0] for k in kept)
    assert len(sessions._sessions[target].recipes) == 1


def test_recipes_tell_apart_what_the_steps_depend_on():
    """One recipe per drafter setting and sampling setting, the same for a drafter made anew per call (the
    draft model keeps its cache), at most MAX_RECIPES of them."""
    target = tiny("llama")
    draft = perturbed(target)
    ids, mask = prompts(1, 6, 0)

    def run(**options):
        specdec.generate(target, ids, attention_mask=mask, max_new_tokens=6, fast_path=True, **options)
        return len(sessions._sessions[target].recipes)

    assert run(assistant_model=draft) == run(assistant_model=draft) == 1
    assert run(drafter=specdec.DraftModel(draft, num_draft_tokens=2)) == 2
    assert run(prompt_lookup_num_tokens=3) == run(prompt_lookup_num_tokens=3) == 3
    assert run(prompt_lookup_num_tokens=3, do_sample=True) == 4
    assert run(prompt_lookup_num_tokens=3, min_new_tokens=2) == 5
    for n in range(4, 4 + sessions.MAX_RECIPES):
        run(prompt_lookup_num_tokens=n)
    assert len(sessions._sessions[target].recipes) == sessions.MAX_RECIPES


def test_a_call_that_does_not_fit_replaces_the_buffers():
    target = tiny("qwen2")
    ids, mask = prompts(2, 6, 0)
    specdec.generate(target, ids, attention_mask=mask, max_new_tokens=8, fast_path=True)
    first = sessions._sessions[target]
    assert first.seqs.limit == sessions.ROUND
    specdec.generate(target, ids, attention_mask=mask, max_new_tokens=sessions.ROUND, fast_path=True)
    assert sessions._sessions[target].seqs.limit == 2 * sessions.ROUND
    ids, mask = prompts(3, 6, 1)
    got = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=8, fast_path=True)
    assert sessions._sessions[target].seqs.tokens.shape[0] == 3
    assert torch.equal(got, target.generate(ids, attention_mask=mask, max_new_tokens=8))


def test_a_call_inside_a_running_one_gets_buffers_of_its_own():
    """A streamer that generates with the same model while the outer call runs must not write into the outer
    call's buffers (it did, before calls marked their session busy)."""
    target = tiny("llama")
    ids, _ = prompts(1, 6, 2)
    inner_ids, _ = prompts(1, 9, 3)
    inner = []

    class Nested:
        def put(self, value):
            inner.append(specdec.generate(target, inner_ids, prompt_lookup_num_tokens=3, max_new_tokens=5,
                                          fast_path=True))

        def end(self):
            pass

    got = specdec.generate(target, ids, prompt_lookup_num_tokens=3, max_new_tokens=12, fast_path=True,
                           streamer=Nested())
    assert torch.equal(got, target.generate(ids, max_new_tokens=12))
    assert all(torch.equal(x, target.generate(inner_ids, max_new_tokens=5)) for x in inner)
    assert not sessions._sessions[target].busy


def test_release_and_deleting_the_model_free_what_is_kept():
    target = tiny("llama")
    draft = perturbed(target)
    ids, mask = prompts(1, 6, 0)
    specdec.generate(target, ids, attention_mask=mask, assistant_model=draft, max_new_tokens=6, fast_path=True)
    assert draft in sessions._sessions[target].kept
    specdec.release(draft)
    assert draft not in sessions._sessions[target].kept
    specdec.release(target)
    assert target not in sessions._sessions
    specdec.generate(target, ids, attention_mask=mask, max_new_tokens=6, fast_path=True)
    gc.collect()  # earlier tests' models that only a reference cycle keeps: gone before counting
    count = len(sessions._sessions)
    del target
    gc.collect()
    assert len(sessions._sessions) == count - 1


def test_an_error_mid_call_leaves_the_session_free():
    target = tiny("llama")
    ids, mask = prompts(1, 6, 0)

    class Broken(specdec.PromptLookup):
        def propose(self, seqs):
            raise RuntimeError("drafter failed")

    with pytest.raises(RuntimeError, match="drafter failed"):
        specdec.generate(target, ids, attention_mask=mask, drafter=Broken(3), max_new_tokens=6, fast_path=True)
    assert not sessions._sessions[target].busy
    got = specdec.generate(target, ids, attention_mask=mask, prompt_lookup_num_tokens=3, max_new_tokens=6,
                           fast_path=True)
    assert torch.equal(got, target.generate(ids, attention_mask=mask, max_new_tokens=6))


@pytest.mark.parametrize("kind", ["lookup_tree", "draft_tree", "medusa", "eagle"])
def test_compiled_calls_with_prompts_of_new_lengths_do_not_recompile(kind):
    """The compiled step's shapes come from the kept buffers, not from the prompt (each new length recompiled
    it before sessions: 4 to 5 compiles over 5 calls), and so do the draft model's and the heads' compiled
    passes'."""
    from specdec.bench import _graphs_compiled

    torch._dynamo.reset()  # nothing compiled by earlier tests
    target = tiny("llama")
    drafter = make_drafter(kind, target)
    compiled = []
    for width, new in [(5, 16), (9, 12), (13, 20), (21, 8)]:
        ids, mask = prompts(1, width, width)
        before = _graphs_compiled()
        got = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=new, compile=True)
        compiled.append(_graphs_compiled() - before)
        assert torch.equal(got, target.generate(ids, attention_mask=mask, max_new_tokens=new))
    assert compiled[0] > 0 and compiled[1:] == [0, 0, 0]


def test_compiled_calls_of_a_new_batch_size_get_static_graphs():
    """Each batch size compiles its own static step: a second batch size made Dynamo mark the batch dimension
    dynamic ("automatic dynamic"), and a third then reused that symbolic graph, where the step a CUDA graph
    captures has fixed shapes."""
    from specdec.bench import _graphs_compiled

    torch._dynamo.reset()
    target = tiny("llama")
    compiled = []
    for batch in (1, 3, 5):
        ids, mask = prompts(batch, 6, batch)
        before = _graphs_compiled()
        got = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=6, compile=True, pad_token_id=PAD)
        compiled.append(_graphs_compiled() - before)
        assert torch.equal(got, target.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD))
    assert all(n > 0 for n in compiled), compiled


@pytest.mark.parametrize("moved", ["target", "draft"])
def test_weights_that_moved_start_the_session_over(moved):
    """Graphs record where the weights are: after the target's or the draft's weights move (``model.to``,
    here reassigned in place), the next call must not reuse what recorded the old place."""
    target = tiny("llama")
    draft = perturbed(target)
    ids, mask = prompts(2, 6, 0)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    run = lambda: specdec.generate(target, ids, attention_mask=mask, assistant_model=draft, max_new_tokens=12,
                                   fast_path=True)  # noqa: E731
    assert torch.equal(run(), expected)
    session, kept = sessions._sessions[target], sessions._sessions[target].kept[draft]
    for p in (target if moved == "target" else draft).parameters():
        p.data = p.data.clone()
    assert torch.equal(run(), expected)
    assert (sessions._sessions[target] is not session) == (moved == "target")
    assert sessions._sessions[target].kept[draft] is not kept


def test_two_drafters_on_one_target_keep_their_own_state():
    """Each draft model keeps its own cache in the target's session, and each its own recipe."""
    target = tiny("llama")
    drafts = [perturbed(target, seed=s) for s in (1, 2)]
    ids, mask = prompts(1, 6, 0)
    for draft in drafts * 2:
        got = specdec.generate(target, ids, attention_mask=mask, assistant_model=draft, max_new_tokens=8,
                               fast_path=True)
        assert torch.equal(got, target.generate(ids, attention_mask=mask, max_new_tokens=8))
    kept = sessions._sessions[target].kept
    assert len(kept) == 2 and kept[drafts[0]].cache is not kept[drafts[1]].cache
    assert len(sessions._sessions[target].recipes) == 2
