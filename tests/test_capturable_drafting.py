"""Drafters that draft inside the step a CUDA graph captures (``Drafter.drafts_in_step``), where a
replay runs no Python: checked here on a CPU, over whole ``generate`` calls, that their ``propose`` never
reads the device, always proposes ``fixed_nodes`` nodes, leaves its Python-side state as it found it, and
that the loop's count of their forward passes is the true one."""

from contextlib import contextmanager

import pytest
import torch

import specdec
from models import prompts, tiny
from specdec import heads
from specdec.cache import TreeCache
from test_greedy import make_drafter

KINDS = ["prompt_lookup", "lookup_tree", "medusa", "draft_chain", "draft_tree", "eagle"]

# What reads a tensor's values back to the host (or sizes a result by them), which a captured graph cannot.
READS = {
    torch.Tensor: ["item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__"],
    torch: ["nonzero", "multinomial", "tensor"],
}


@pytest.fixture
def no_device_reads(monkeypatch):
    """A context manager inside which every function in ``READS`` raises."""
    inside = [False]

    def guarded(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            if inside[0]:
                raise AssertionError(f"propose called {name}, which reads the device")
            return real(*args, **kwargs)
        return call

    for owner, names in READS.items():
        for name in names:
            monkeypatch.setattr(owner, name, guarded(owner, name))

    @contextmanager
    def guard():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False
    return guard


def python_state(value):
    """What a replayed graph could not restore: values of Python objects, and tensors by identity (a graph
    keeps writing to the tensors it recorded)."""
    if isinstance(value, torch.Tensor):
        return "tensor", id(value)
    if isinstance(value, (tuple, list)):
        return tuple(python_state(v) for v in value)
    if isinstance(value, TreeCache):
        return value.held, [(layer.length, layer.held, layer.capacity, id(layer._k), id(layer._v))
                            for layer in value.layers]
    return value


def drafting_module(drafter):
    """The module each forward pass of the drafter runs (None: prompt lookup runs none)."""
    if isinstance(drafter, specdec.DraftModel):
        return drafter.model
    if isinstance(drafter, heads.Medusa):
        return drafter.heads
    if isinstance(drafter, heads.Eagle):
        return drafter.head.decoder
    return None


@pytest.fixture(scope="module")
def target():
    return tiny("llama")


@pytest.mark.parametrize("fast_path", [True, False], ids=["fixed-shapes", "dynamic"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("kind", KINDS)
def test_propose_is_device_work_alone(no_device_reads, target, kind, do_sample, fast_path, monkeypatch):
    torch.manual_seed(0)
    drafter = make_drafter(kind, target)
    assert drafter.drafts_in_step and drafter.fixed_nodes is not None, "drafting is not captured with verification"
    trees = []
    real_propose = type(drafter).propose

    def propose(self, seqs):  # on the call's copy of the drafter
        before = {name: python_state(value) for name, value in vars(self).items()}
        with no_device_reads():
            tree = real_propose(self, seqs)
        assert {name: python_state(value) for name, value in vars(self).items()} == before
        trees.append(tree)
        return tree

    monkeypatch.setattr(type(drafter), "propose", propose)
    passes = []
    module = drafting_module(drafter)
    hook = module.register_forward_pre_hook(lambda *_: passes.append(1)) if module is not None else None
    ids, mask = prompts(3, 7, seed=2)
    try:
        out = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=20,
                               do_sample=do_sample, fast_path=fast_path, return_dict_in_generate=True)
    finally:
        if hook is not None:
            hook.remove()
    assert len(trees) == out.stats.steps > 1
    for tree in trees:
        for name in ("tokens", "parents", "valid"):
            assert getattr(tree, name).shape == (3, drafter.fixed_nodes)
        assert (tree.draft_probs is not None) == (do_sample and kind not in ("prompt_lookup", "lookup_tree"))
    assert out.stats.draft_forwards == len(passes) >= drafter.forwards_per_step * out.stats.steps
    if not do_sample:
        expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
        assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("kind", ["draft_tree", "eagle"])
def test_prompt_too_short_to_prefill_the_drafter(target, kind, width):
    """The drafter's cache is held before its model ever wrote to it: its layers join the hold."""
    ids, mask = prompts(3, width, seed=4, ragged=False)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    got = specdec.generate(target, ids, attention_mask=mask, drafter=make_drafter(kind, target), max_new_tokens=12)
    assert torch.equal(got, expected)
