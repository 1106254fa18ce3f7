"""``speculation="auto"`` (specdec.adaptive): the choice follows measured throughput, the output stays the
target's through every switch between modes, and a drafter that sat out steps catches up exactly."""

import pytest
import torch

import specdec
from models import prompts, tiny
from specdec import adaptive, heads
from specdec import session as sessions
from test_greedy import make_drafter
from test_sampling import PROMPT, ROWS, SETTINGS, V, chi2_pvalue, make_drafter as sampling_drafter, warpers


class Clock:
    """A device whose steps take ``cost[mode]`` seconds and give ``tokens[mode]`` tokens: the policy alone."""

    def __init__(self, cost, tokens):
        self.cost, self.tokens, self.now, self.new = cost, tokens, 0.0, 0
        self.chooser = None

    def __call__(self):
        return self.now, self.new

    def run(self, steps):
        chosen = []
        for _ in range(steps):
            mode = self.chooser.current
            chosen.append(mode)
            self.now += self.cost[mode]
            self.new += self.tokens[mode]
            self.chooser.stepped()
        return chosen


def test_every_mode_is_tried_then_the_fastest_runs_and_the_others_are_retried():
    clock = Clock(cost=[1.0, 1.0, 1.0], tokens=[2, 1, 3])  # mode 2 gives the most tokens per second
    rates = {}
    clock.chooser = adaptive.Speculation(["a", "b", "c"], rates, clock)
    round_ = adaptive.WARM_STEPS + adaptive.ROUND_STEPS
    chosen = clock.run(3 * round_ + adaptive.ROUND_STEPS * 2 * adaptive.EXPLORE_EVERY)
    assert chosen[: 3 * round_] == [0] * round_ + [1] * round_ + [2] * round_  # tried in order, each warmed
    assert rates == pytest.approx({"a": 2.0, "b": 1.0, "c": 3.0})  # warm-up steps are not timed
    rounds = [chosen[3 * round_ + i] for i in range(0, len(chosen) - 3 * round_, adaptive.ROUND_STEPS)]
    assert rounds.count(2) >= len(rounds) - 2 and {0, 1} <= set(rounds)  # the best, and each other retried


def test_a_mode_that_keeps_losing_is_measured_less_and_less_often():
    clock = Clock(cost=[1.0, 1.0], tokens=[1, 4])
    clock.chooser = adaptive.Speculation(["a", "b"], {}, clock)
    chosen = clock.run(2 * (adaptive.WARM_STEPS + adaptive.ROUND_STEPS) + 200 * adaptive.ROUND_STEPS)
    retried = [i for i in range(1, len(chosen)) if chosen[i] == 0 and chosen[i - 1] == 1]
    gaps = [b - a for a, b in zip(retried, retried[1:])]
    assert len(gaps) >= 3 and all(b == 2 * a for a, b in zip(gaps, gaps[1:]))  # MAX_WAIT not reached here


def test_a_later_call_starts_from_the_rates_kept():
    clock = Clock(cost=[1.0, 1.0], tokens=[1, 4])
    chooser = adaptive.Speculation(["a", "b"], {"a": 1.0, "b": 4.0}, clock)
    assert chooser.current == 1


@pytest.fixture
def switching(monkeypatch):
    """Rounds of one step, none warmed, every other round a retry: the modes change nearly every step."""
    monkeypatch.setattr(adaptive, "ROUND_STEPS", 1)
    monkeypatch.setattr(adaptive, "WARM_STEPS", 0)
    monkeypatch.setattr(adaptive, "EXPLORE_EVERY", 2)


def test_auto_stops_drafting_when_drafting_costs_more_than_it_gains():
    """A draft model far costlier than the target and unrelated to it: auto soon decodes plainly, and keeps
    that choice for the next call on the session."""
    target = tiny()
    draft = tiny(seed=7, hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6)
    ids, mask = prompts(1, 12, seed=0)
    options = dict(attention_mask=mask, drafter=specdec.DraftModel(draft, num_draft_tokens=4), max_new_tokens=160,
                   eos_token_id=None, return_dict_in_generate=True, fast_path=True, speculation="auto")
    first = specdec.generate(target, ids, **options)
    assert torch.equal(first.sequences, target.generate(ids, attention_mask=mask, max_new_tokens=160, eos_token_id=None))
    assert first.stats.plain_steps > 0.6 * first.stats.steps
    rates = sessions._sessions[target].rates
    assert max(rates, key=rates.get)[0] == ("none",)  # the plain mode's recipe
    again = specdec.generate(target, ids, **options)
    assert again.stats.plain_steps > 0.8 * again.stats.steps
    assert torch.equal(again.sequences, first.sequences)


def test_always_the_default_drafts_every_step():
    target = tiny()
    ids, mask = prompts(2, 6, seed=1)
    out = specdec.generate(target, ids, attention_mask=mask, drafter=specdec.DraftModel(tiny(seed=5), 3),
                           max_new_tokens=60, return_dict_in_generate=True)
    assert out.stats.plain_steps == 0 and out.stats.steps > adaptive.WARM_STEPS + adaptive.ROUND_STEPS
    assert out.stats.draft_forwards == 1 + 3 * out.stats.steps  # the prompt's pass, then 3 per step


@pytest.mark.parametrize("fast_path", [None, True], ids=["dynamic", "fixed-shapes"])
@pytest.mark.parametrize("kind", ["prompt_lookup", "lookup_tree", "medusa", "draft_chain", "draft_tree", "eagle"])
def test_greedy_equals_generate_through_switches(switching, kind, fast_path):
    target = tiny("llama")
    drafter = make_drafter(kind, target)
    ids, mask = prompts(3, 7, seed=3)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30)
    out = specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=30, fast_path=fast_path,
                           speculation="auto", return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert 0 < out.stats.plain_steps < out.stats.steps


def drafted_trees(monkeypatch, drafter_type):
    """Each proposed tree's tokens and the keys the drafter's first layer then holds, by the sequence they
    extend (row 0), and the sequences proposed right after the drafter caught up."""
    trees, after_resync, caught_up = {}, set(), [False]
    propose, resync = drafter_type.propose, drafter_type.resync

    def recording_propose(self, seqs):
        tree = propose(self, seqs)
        prefix = tuple(seqs.tokens[0, : int(seqs.end[0])].tolist())
        keys = self.cache.layers[0]._k[0, :, : int(self.cache.ends[0])].clone()
        trees[prefix] = tree.tokens[0].tolist(), keys
        if caught_up[0]:
            after_resync.add(prefix)
            caught_up[0] = False
        return tree

    def recording_resync(self, seqs):
        resync(self, seqs)
        caught_up[0] = True

    monkeypatch.setattr(drafter_type, "propose", recording_propose)
    monkeypatch.setattr(drafter_type, "resync", recording_resync)
    return trees, after_resync


@pytest.mark.parametrize("kind", ["draft", "eagle"])
def test_a_drafter_that_sat_out_steps_drafts_what_it_would_have(monkeypatch, kind):
    """After plain steps or another shape's, the draft model's or EAGLE head's cache is brought up to the
    sequence: its cache and the trees it drafts then equal those at the same sequence when it drafted every
    step (an unrelated draft accepts little, so that run drafts at nearly every length)."""
    target = tiny()
    torch.manual_seed(0)
    drafter = (specdec.DraftModel(tiny(seed=5), num_draft_tokens=3) if kind == "draft"
               else heads.Eagle(heads.EagleHead(target), top_k=3, depth=3, total_tokens=8))
    ids, mask = prompts(1, 9, seed=6)
    trees, after_resync = drafted_trees(monkeypatch, type(drafter))
    specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=100, speculation="always")
    always = dict(trees)
    trees.clear()
    # Rounds of 6 steps: a stretch of plain steps puts the drafter further behind than a step's catch-up feeds.
    monkeypatch.setattr(adaptive, "ROUND_STEPS", 6)
    monkeypatch.setattr(adaptive, "WARM_STEPS", 0)
    monkeypatch.setattr(adaptive, "EXPLORE_EVERY", 2)
    specdec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=100, speculation="auto")
    compared = [p for p in trees if p in always and len(trees[p][0]) == len(always[p][0])]
    assert len(set(compared) & after_resync) >= 3
    for p in compared:
        assert trees[p][0] == always[p][0]
        torch.testing.assert_close(trees[p][1], always[p][1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def exact_third_and_fourth(model, settings):
    """P(x3, x4) for the third and fourth tokens generated after ``PROMPT``: the sum over the first two."""
    procs = warpers(**settings)
    dist = lambda ids: procs(ids, model(ids).logits[:, -1].float()).softmax(-1)  # noqa: E731
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (V*V, 2)
    p1 = dist(PROMPT)[0]
    firsts = torch.cat([PROMPT.repeat(V, 1), torch.arange(V)[:, None]], 1)
    p12 = (p1[:, None] * dist(firsts)).reshape(-1)  # (V*V,)
    twos = torch.cat([PROMPT.repeat(V * V, 1), grid], 1)
    threes = torch.cat([twos.repeat_interleave(V, 0), torch.arange(V).repeat(V * V)[:, None]], 1)
    p34 = dist(twos)[:, :, None] * dist(threes).reshape(V * V, V, V)
    return (p12[:, None, None] * p34).sum(0).numpy()


@pytest.mark.parametrize("kind", ["chain", "lookup", "eagle"])
def test_sampling_through_switches_matches_target_distribution(switching, kind):
    """The chi-square test on the third and fourth tokens, which the rows reach through steps of different
    modes (the first drafted, the next plain, then the smaller shape after catching up)."""
    from test_sampling import make_pair

    target, draft = make_pair()
    torch.manual_seed(0)
    drafter = sampling_drafter(kind, target, draft)
    torch.manual_seed(0)
    out = specdec.generate(target, PROMPT.repeat(ROWS, 1), drafter=drafter, do_sample=True, max_new_tokens=4,
                           eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, speculation="auto",
                           **SETTINGS[1])
    assert out.stats.plain_steps > 0 and out.stats.accepted_tokens > 0.05 * ROWS
    samples = out.sequences[:, PROMPT.shape[1] + 2:].numpy()
    assert chi2_pvalue(samples, exact_third_and_fourth(target, SETTINGS[1])) > 1e-3
