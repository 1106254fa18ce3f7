"""``speculation="auto"``: which drafting shape, or plain decoding, each stretch of a call runs, from a cost
model measured while it runs.

Terms:

- *mode*: one way to run a step. A call's modes are the drafter as given (mode 0), plain decoding (the verifier
  over the root alone, nothing drafted), then the smaller shapes the drafter offers (``Drafter.shapes``). A
  mode's *depth* is the most drafted tokens one of its steps can accept: None for mode 0 (as deep as it
  drafts), 0 for plain decoding, ``Drafter.max_depth`` for a smaller shape.
- *round*: ``ROUND_STEPS`` consecutive steps in one mode, timed from one wait for the device to the next. A
  mode's first round in a call starts after ``WARM_STEPS`` untimed steps, which capture its graphs and compile
  it, and are real steps all the same.
- *cost*: a mode's seconds per step, host included. It is set by the batch and the tree's shape, not by the
  text, so one round measures it well; later rounds keep it current.
- *acceptance*: how many rows accepted 0, 1, 2, ... drafted tokens per step in mode 0 (the device counts
  them, ``step.ACCEPTED_BINS``), older rounds weighing less. It changes with the text, and it predicts every
  mode's tokens per step: a mode of depth d gains 1 + min(L, d) where mode 0 gained 1 + L. That is exact for
  chains, whose smaller shape drafts a prefix of the larger one's chain, and an upper bound for trees, whose
  smaller shape also has fewer branches. Plain decoding gains 1.

The mode with the most predicted tokens per second runs. Every mode runs one round first, for its cost, the
drafter as given first. While another mode is ahead, mode 0, the only one that measures acceptance, runs a
round again ``EXPLORE_EVERY`` rounds later, and each time it is still behind twice as long after (at most
``MAX_WAIT`` rounds). Costs and acceptance are kept in the session (under each mode's recipe), so a later call
starts from them: the cost model, measured once per target, drafter and batch size, and kept up to date.

Lossless whatever it picks: a plain step verifies a tree with nothing drafted, and each choice depends on steps
already run, never on what a later step samples. Seeded sampling therefore stays exact in distribution, but
which steps draft follows the timing, so two runs with one seed may sample different text;
``speculation="always"`` makes them repeat.
"""

from __future__ import annotations

from typing import Callable, Hashable

ROUND_STEPS = 16
WARM_STEPS = 2
EXPLORE_EVERY = 8
MAX_WAIT = 128
MEMORY = 0.5  # the weight of acceptance measured before a round, after it


class Speculation:
    """Chooses the mode of each step. ``keys`` and ``depths``: one per mode (see the module's terms); ``kept``:
    what the caller keeps across calls (costs and acceptance, filled here); ``clock()`` waits for the device and
    returns (seconds, the acceptance counters so far). The loop reads ``current`` before each step and calls
    ``stepped()`` after queueing it."""

    def __init__(self, keys: list[Hashable], depths: list[int | None], kept: dict,
                 clock: Callable[[], tuple[float, list[int]]]):
        self.keys, self.depths, self.kept, self.clock = keys, depths, kept, clock
        self.wait = EXPLORE_EVERY  # rounds until mode 0 runs again while another is ahead
        self.due = EXPLORE_EVERY  # the round at which it does
        self.warmed: set[int] = set()
        self.rounds = 0
        self.current = self._choose()
        self._start(None)

    def tokens_per_step(self, mode: int) -> float | None:
        """Per row, predicted from mode 0's acceptance; None before it is measured."""
        accepted = self.kept.get(("accepted", self.keys[0]))
        if not accepted or sum(accepted) == 0:
            return None
        depth = self.depths[mode]
        gained = sum(n * (length if depth is None else min(length, depth)) for length, n in enumerate(accepted))
        return 1 + gained / sum(accepted)

    def _best(self) -> int:
        return max(range(len(self.keys)),
                   key=lambda m: self.tokens_per_step(m) / max(self.kept[("cost", self.keys[m])], 1e-12))

    def _choose(self) -> int:
        unmeasured = [m for m, key in enumerate(self.keys) if ("cost", key) not in self.kept]
        if unmeasured:
            return unmeasured[0]
        if self.tokens_per_step(0) is None:
            return 0
        best = self._best()
        return 0 if best != 0 and self.rounds >= self.due else best

    def _record(self, mode: int, seconds: float, steps: int, accepted: list[int]) -> None:
        key = ("cost", self.keys[mode])
        cost = seconds / steps
        self.kept[key] = cost if key not in self.kept else (self.kept[key] + cost) / 2
        if mode == 0:
            before = self.kept.get(("accepted", self.keys[0]), [0] * len(accepted))
            self.kept[("accepted", self.keys[0])] = [MEMORY * b + a for b, a in zip(before, accepted)]
            ready = all(("cost", k) in self.kept for k in self.keys) and self.tokens_per_step(0) is not None
            self.wait = min(2 * self.wait, MAX_WAIT) if ready and self._best() != 0 else EXPLORE_EVERY
            self.due = self.rounds + self.wait

    def _start(self, now: tuple[float, list[int]] | None) -> None:
        """A round of ``current``: warming first if this call has not run it; ``now``, the last reading if
        the device was just waited for."""
        self.warm = 0 if self.current in self.warmed else WARM_STEPS
        self.steps = 0
        self.began = None if self.warm else now if now is not None else self.clock()

    def stepped(self) -> None:
        if self.warm:
            self.warm -= 1
            if not self.warm:
                self.warmed.add(self.current)
                self.began = self.clock()
            return
        self.steps += 1
        if self.steps < ROUND_STEPS:
            return
        now = self.clock()
        accepted = [n - m for n, m in zip(now[1], self.began[1])]
        self._record(self.current, now[0] - self.began[0], self.steps, accepted)
        self.rounds += 1
        self.current = self._choose()
        self._start(now)
