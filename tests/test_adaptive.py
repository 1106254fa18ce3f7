"""``speculation="auto"`` (specdec.adaptive): the choice follows the measured costs and acceptance, the output
stays the target's through every switch between modes, and a drafter that sat out steps catches up exactly."""

import pytest
import torch

import specdec
from models import perturbed, prompts, tiny
from specdec import adaptive, heads
from specdec import session as sessions
from specdec.sampling import Sampling
from specdec.sequences import Sequences
from specdec.step import ACCEPTED_BINS, COUNTER_SIZE, COUNTERS, keep_accepted
from specdec.tree import Tree
from test_greedy import make_drafter
from test_sampling import PROMPT, ROWS, SETTINGS, V, chi2_pvalue, make_drafter as sampling_drafter, warpers


@pytest.fixture
def switching(monkeypatch):
    """Round by round the modes in turn, whatever the measurements, in rounds of ``switching(steps)`` steps (1
    unless called), none warmed: what the loop must get right through any sequence of choices."""
    def in_turn(self):
        self.turns = getattr(self, "turns", -1) + 1
        return self.turns % len(self.keys)

    monkeypatch.setattr(adaptive, "WARM_STEPS", 0)
    monkeypatch.setattr(adaptive.Speculation, "_choose", in_turn)

    def rounds_of(steps: int) -> None:
        monkeypatch.setattr(adaptive, "ROUND_STEPS", steps)
    rounds_of(1)
    return rounds_of


class Device:
    """A scripted device for the policy alone: a step of mode m takes ``cost[m]`` seconds, and each row accepts
    ``accepted(step)`` drafted tokens in mode 0, at most a mode's depth in the others (the counters' bins)."""

    cuda = False
    between = adaptive.DeviceClock.between  # a host clock's reading: the time, then the counters

    def __init__(self, cost, depths, accepted):
        self.cost, self.depths, self.accepted = cost, depths, accepted
        self.now, self.bins = 0.0, [0] * ACCEPTED_BINS

    def mark(self):
        return self.now, list(self.bins)

    def run(self, chooser, steps):
        chosen = []
        for step in range(steps):
            mode = chooser.current
            chosen.append(mode)
            self.now += self.cost[mode]
            depth = self.depths[mode]
            self.bins[self.accepted(step) if depth is None else min(self.accepted(step), depth)] += 1
            chooser.stepped()
        chooser.finish()
        return chosen


MODES, DEPTHS = ["drafter", "plain", "half"], [None, 0, 2]
ROUND = adaptive.WARM_STEPS + adaptive.ROUND_STEPS


def test_each_mode_runs_once_for_its_cost_then_the_most_tokens_per_second_predicted():
    device = Device(cost=[2.0, 1.0, 1.5], depths=DEPTHS, accepted=lambda step: 4)
    kept = {}
    chooser = adaptive.Speculation(MODES, DEPTHS, kept, device)
    chosen = device.run(chooser, 3 * ROUND + 40 * adaptive.ROUND_STEPS)
    assert chosen[: 3 * ROUND] == [0] * ROUND + [1] * ROUND + [2] * ROUND  # in order, each warmed first
    assert {k: kept[("cost", k)] for k in MODES} == {"drafter": 2.0, "plain": 1.0, "half": 1.5}  # warm-up untimed
    # 5 tokens in 2 s beat 1 in 1 s and 3 (a chain of 2 accepts both of the 4) in 1.5 s.
    assert chooser.tokens_per_step(2) == 3 and set(chosen[3 * ROUND:]) == {0}


def test_with_nothing_accepted_plain_decoding_runs_and_re_measuring_the_drafter_costs_little():
    device = Device(cost=[2.0, 1.0, 1.5], depths=DEPTHS, accepted=lambda step: 0)
    chooser = adaptive.Speculation(MODES, DEPTHS, {}, device)
    chosen = device.run(chooser, 3 * ROUND + 5 * (adaptive.EXPLORE + 2) * adaptive.ROUND_STEPS)
    later = chosen[3 * ROUND:]
    assert later.count(1) > 0.9 * len(later) and 2 not in later
    retried = [i for i in range(1, len(later)) if later[i] == 0 and later[i - 1] == 1]
    gaps = [b - a for a, b in zip(retried, retried[1:])]
    assert len(gaps) >= 3 and len(set(gaps)) == 1  # the costs stay the same, and so does the wait
    # A drafter step gains 1 token in 2 s, where plain decoding gains 1 in 1 s: half of each retry is lost.
    lost = 0.5 * sum(device.cost[0] for mode in later if mode == 0)
    assert lost <= sum(device.cost[mode] for mode in later) / adaptive.EXPLORE


def test_when_the_text_turns_predictable_the_drafter_takes_over_again():
    turn = 3 * ROUND + 30 * adaptive.ROUND_STEPS
    device = Device(cost=[2.0, 1.0, 1.5], depths=DEPTHS, accepted=lambda step: 0 if step < turn else 6)
    chooser = adaptive.Speculation(MODES, DEPTHS, {}, device)
    chosen = device.run(chooser, turn + 80 * adaptive.ROUND_STEPS)
    assert 1 in chosen[3 * ROUND: turn] and set(chosen[-20 * adaptive.ROUND_STEPS:]) == {0}


def test_calls_shorter_than_the_wait_still_re_try_the_drafter():
    """The schedule is kept with the costs: it started anew in each call, 8 rounds in, so with calls of 3
    rounds (batch 1) a drafter once judged behind was never measured again."""
    kept, predictable = {}, [False]
    device = Device(cost=[2.0, 1.0, 1.5], depths=DEPTHS, accepted=lambda step: 6 if predictable[0] else 0)
    calls = []
    for call in range(60):
        predictable[0] = call >= 20
        calls.append(device.run(adaptive.Speculation(MODES, DEPTHS, kept, device), 3 * adaptive.ROUND_STEPS))
    assert all(1 in chosen for chosen in calls[5:20]) and all(set(chosen) == {0} for chosen in calls[-10:])


def test_a_later_call_starts_from_what_the_session_kept():
    kept = {("cost", "drafter"): 2.0, ("cost", "plain"): 1.0, ("cost", "half"): 1.5,
            ("accepted", "drafter"): [1.0] + [0.0] * (ACCEPTED_BINS - 1),
            ("schedule", "drafter"): {"seconds": 40.0, "explored": 40.0, "round": 32.0}}
    device = Device(cost=[2.0, 1.0, 1.5], depths=DEPTHS, accepted=lambda step: 0)
    assert adaptive.Speculation(MODES, DEPTHS, kept, device).current == 1


def test_the_step_bins_the_acceptance_of_the_row_furthest_behind():
    """Row 0 accepts its whole chain of 4 and row 1 none: the call waits for row 1, so its 0 is binned. The bins
    held one count per row, and at batch 64 credited drafting with what rows far ahead gained."""
    seqs = Sequences.from_prompt(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 20)
    chain = torch.tensor([[1, 5, 6, 7, 8]] * 2)
    tree = Tree.drafted(chain, torch.arange(-1, 4).expand(2, -1), seqs.finished)
    predicted = torch.tensor([[5, 6, 7, 8, 9], [9, 9, 9, 9, 9]])  # the target's argmax after each node
    logits = torch.nn.functional.one_hot(predicted, 16).float()
    counters = torch.zeros(COUNTER_SIZE, dtype=torch.long)
    greedy = Sampling(False, 1.0, None, None, (), 0, 0)
    keep_accepted(tree, logits, None, greedy, seqs, counters)
    assert seqs.end.tolist() == [8, 4] and counters[COUNTERS.index("accepted_tokens")] == 4
    assert counters[len(COUNTERS):].tolist() == [1] + [0] * (ACCEPTED_BINS - 1)


def test_the_loop_bins_every_step_but_the_last():
    """The last step closes the last open row, so no row is behind after it."""
    target = tiny()
    ids, mask = prompts(3, 6, seed=2)
    out = specdec.generate(target, ids, attention_mask=mask, drafter=specdec.DraftModel(perturbed(target), 4),
                           max_new_tokens=40, fast_path=True, return_dict_in_generate=True)
    bins = sessions._sessions[target].counters[len(COUNTERS):].tolist()
    assert sum(bins) == out.stats.steps - 1


def test_auto_stops_drafting_when_drafting_costs_more_than_it_gains():
    """A draft model far costlier than the target and unrelated to it: auto soon decodes plainly, and the next
    call on the session starts there."""
    target = tiny()
    draft = tiny(seed=7, hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6)
    ids, mask = prompts(1, 12, seed=0)
    options = dict(attention_mask=mask, drafter=specdec.DraftModel(draft, num_draft_tokens=4), max_new_tokens=160,
                   eos_token_id=None, return_dict_in_generate=True, fast_path=True, speculation="auto")
    first = specdec.generate(target, ids, **options)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=160, eos_token_id=None)
    assert torch.equal(first.sequences, expected)
    assert first.stats.plain_steps > 0.6 * first.stats.steps
    costs = {recipe[0]: cost for recipe, cost in sessions.measured_costs(target).items()}
    assert costs[("none",)] < min(cost for drafted, cost in costs.items() if drafted != ("none",))  # plain: cheapest
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

    def recording_resync(self, seqs, replay):
        resync(self, seqs, replay)
        caught_up[0] = True

    monkeypatch.setattr(drafter_type, "propose", recording_propose)
    monkeypatch.setattr(drafter_type, "resync", recording_resync)
    return trees, after_resync


@pytest.mark.parametrize("kind", ["draft", "eagle"])
def test_a_drafter_that_sat_out_steps_drafts_what_it_would_have(monkeypatch, switching, kind):
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
    switching(6)
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
