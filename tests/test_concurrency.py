"""Calls that share a target, a draft model or a drafter object, from threads or nested in a streamer, each
get the text they get alone. Before, three of four threads sharing a draft model died on a size mismatch,
heads drafters mixed up each other's features, and a nested call with the same draft model killed the
outer one."""

from __future__ import annotations

import threading

import pytest
import torch

import specdec
from specdec import heads

THREADS = 4


def prompts(models, n):
    return [models.tokenizer(p, return_tensors="pt") for p in models.prompts(n)]


def run_in_threads(call, inputs):
    """``call(x)`` for each input at once, one thread each, after a barrier; returns results or raises."""
    barrier, results, errors = threading.Barrier(len(inputs)), [None] * len(inputs), []

    def work(i, x):
        try:
            barrier.wait()
            results[i] = call(x)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, x)) for i, x in enumerate(inputs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def shared(models):
    """One drafter object of each kind, shared by every call."""
    return {"draft model": specdec.DraftModel(models.draft), "prompt lookup": specdec.PromptLookup(),
            "medusa": heads.load(models.medusa, models.target), "eagle": heads.load(models.eagle, models.target)}


@pytest.mark.parametrize("fast_path", [None, True], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("kind", ["draft model", "prompt lookup", "medusa", "eagle"])
def test_threads_sharing_a_drafter_each_get_their_own_text(models, shared, kind, fast_path):
    inputs = prompts(models, THREADS)
    alone = [models.target.generate(**x, do_sample=False, max_new_tokens=24) for x in inputs]
    together = run_in_threads(lambda x: specdec.generate(models.target, **x, drafter=shared[kind],
                                                         max_new_tokens=24, fast_path=fast_path), inputs)
    for got, expected in zip(together, alone):
        assert torch.equal(got, expected)


def test_threads_with_their_own_heads_and_assistant_models_on_one_target(models):
    inputs = prompts(models, THREADS)
    alone = [models.target.generate(**x, do_sample=False, max_new_tokens=24) for x in inputs]
    per_thread = run_in_threads(
        lambda x: specdec.generate(models.target, **x, drafter=heads.load(models.eagle, models.target),
                                   max_new_tokens=24), inputs)
    assisted = run_in_threads(
        lambda x: specdec.generate(models.target, **x, assistant_model=models.draft, max_new_tokens=24), inputs)
    for a, b, expected in zip(per_thread, assisted, alone):
        assert torch.equal(a, expected) and torch.equal(b, expected)


class Nesting:
    """A streamer that, at the outer call's third step, makes a whole call of its own with the same drafter."""

    def __init__(self, call):
        self.call, self.puts, self.inner = call, 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 3:
            self.inner = self.call()

    def end(self):
        pass


@pytest.mark.parametrize("kind", ["draft model", "eagle", "medusa"])
def test_a_nested_call_with_the_same_drafter_leaves_the_outer_call_whole(models, shared, kind):
    outer_x, inner_x = prompts(models, 2)
    expected = [models.target.generate(**x, do_sample=False, max_new_tokens=20) for x in (outer_x, inner_x)]
    streamer = Nesting(lambda: specdec.generate(models.target, **inner_x, drafter=shared[kind], max_new_tokens=20,
                                                fast_path=True))
    outer = specdec.generate(models.target, **outer_x, drafter=shared[kind], max_new_tokens=20, streamer=streamer,
                             fast_path=True)
    assert torch.equal(outer, expected[0]) and torch.equal(streamer.inner, expected[1])


def test_the_callers_drafter_keeps_no_call_state(models, shared):
    """Every call drafts with its own copy of the drafter: the object the caller holds gets no per-call
    attributes (caches, sampling settings) that another call could meet."""
    before = {kind: dict(vars(drafter)) for kind, drafter in shared.items()}
    x = prompts(models, 1)[0]
    for kind, drafter in shared.items():
        specdec.generate(models.target, **x, drafter=drafter, max_new_tokens=8, fast_path=True)
        assert vars(drafter).keys() == before[kind].keys()


def test_overlapping_kernel_passes_leave_the_config_as_it_was():
    """On CUDA each verifier pass points the shared config at the tree kernel and restores it. Two passes that
    overlapped (threads) restored each other's setting: the config was left naming the kernel, and a plain
    forward then failed."""
    import time

    from models import tiny
    from specdec import attention

    model = tiny("llama")
    original = model.config._attn_implementation
    inside, second_inside, seen = threading.Event(), threading.Event(), []

    def first():
        with attention.kernel_attention(model):
            inside.set()
            second_inside.wait(0.3)  # ends while the second pass runs, if that one could start

    def second():
        inside.wait()
        with attention.kernel_attention(model):
            second_inside.set()
            time.sleep(0.3)
            seen.append(model.config._attn_implementation)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [attention.KERNEL] and model.config._attn_implementation == original
