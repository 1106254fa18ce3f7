"""``speculation="auto"``: which drafting shape, or plain decoding, each stretch of a call runs, from a cost
model measured while it runs.

Terms:

- *mode*: one way to run a step. A call's modes are the drafter as given (mode 0), plain decoding (the verifier
  over the root alone, nothing drafted), then the smaller shapes the drafter offers (``Drafter.shapes``). A
  mode's *depth* is the most drafted tokens one of its steps can accept: None for mode 0 (as deep as it
  drafts), 0 for plain decoding, ``Drafter.max_depth`` for a smaller shape.
- *round*: ``ROUND_STEPS`` consecutive steps in one mode, between two *marks* the device records on its stream
  (the time, and the acceptance counters) without the host waiting. A round is read one round later, when the
  device is long past it. A mode's first round in a call starts after ``WARM_STEPS`` untimed steps, which
  capture its graphs and compile it, and are real steps all the same.
- *cost*: a mode's seconds per step, host included. It is set by the batch and the tree's shape, not by the
  text, so one round measures it well; later rounds keep it current.
- *acceptance*: in how many of mode 0's steps the row furthest behind accepted 0, 1, 2, ... drafted tokens
  (the device counts them, ``step.ACCEPTED_BINS``), older rounds weighing less. A call ends with its last row,
  so that row's gain is what a step buys the call (at batch 64 the average row gained 3.9 tokens per prompt
  lookup step where the call's last row gained 1.25, and drafting was slower than plain decoding). Acceptance
  changes with the text, and it predicts every mode's tokens per step: a mode of depth d gains 1 + min(L, d)
  where mode 0 gained 1 + L. That is exact for chains, whose smaller shape drafts a prefix of the larger one's
  chain, and an upper bound for trees, whose smaller shape also has fewer branches. Plain decoding gains 1.
- *regret*: what a round of mode 0 loses against the best mode, when another mode is predicted faster: the
  round's seconds times the share of its tokens per second it falls short by.

The mode with the most predicted tokens per second runs. Every mode runs one round first, for its cost, the
drafter as given first. While another mode is ahead, mode 0, the only one that measures acceptance, runs a
round again once ``EXPLORE`` times its last regret has passed in measured rounds, so re-measuring costs at
most 1/``EXPLORE`` of the time, and a drafter just behind is re-tried soon. Costs, acceptance and that schedule
are kept in the session (under each mode's recipe), so a later call starts from them: the cost model, measured
once per target, drafter and batch size, and kept up to date.

Lossless whatever it picks: a plain step verifies a tree with nothing drafted, and each choice depends on steps
already run, never on what a later step samples. Seeded sampling therefore stays exact in distribution, but
which steps draft follows the timing, so two runs with one seed may sample different text;
``speculation="always"`` makes them repeat.
"""

from __future__ import annotations

import time
from typing import Hashable

import torch

ROUND_STEPS = 16
WARM_STEPS = 2
EXPLORE = 64
MEMORY = 0.5  # the weight of acceptance measured before a round, after it


def costs(kept: dict) -> dict:
    """The seconds per step measured for each mode, by its key, from what a ``Speculation`` keeps."""
    return {key: cost for (kind, key), cost in kept.items() if kind == "cost"}


class DeviceClock:
    """Marks on the current stream: when the device got there, and ``counters`` (the acceptance bins) then.
    On a CUDA device a mark is an event and a copy into pinned memory, and reading it waits for that mark
    alone; elsewhere the device runs in step with the host, and a mark is read at once."""

    def __init__(self, counters: torch.Tensor):
        self.counters = counters
        self.cuda = counters.device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter(), self.counters.tolist()
        host = torch.empty(self.counters.shape, dtype=self.counters.dtype, pin_memory=True)
        host.copy_(self.counters, non_blocking=True)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event, host

    def between(self, start, end) -> tuple[float, list[int]]:
        """Seconds from ``start`` to ``end``, and how much each counter grew."""
        if not self.cuda:
            return end[0] - start[0], [b - a for a, b in zip(start[1], end[1])]
        end[0].synchronize()
        return start[0].elapsed_time(end[0]) / 1e3, (end[1] - start[1]).tolist()


class Speculation:
    """Chooses the mode of each step. ``keys`` and ``depths``: one per mode (see the module's terms); ``kept``:
    what the caller keeps across calls (costs, acceptance and the schedule, filled here); ``clock``: a
    ``DeviceClock`` (``mark()``, ``between(start, end)``). The loop reads ``current`` before each step, calls
    ``stepped()`` after queueing it, and ``finish()`` after the last."""

    def __init__(self, keys: list[Hashable], depths: list[int | None], kept: dict, clock):
        self.keys, self.depths, self.kept, self.clock = keys, depths, kept, clock
        # "seconds": of every round read so far; "explored": that sum when mode 0's last round was read;
        # "round": that round's seconds.
        self.schedule = kept.setdefault(("schedule", keys[0]), {"seconds": 0.0, "explored": 0.0, "round": 0.0})
        self.warmed: set[int] = set()
        self.pending = None  # (mode, start mark, end mark): the last round, read at the end of the next
        self.current = self._choose()
        self._start(None)

    def tokens_per_step(self, mode: int) -> float | None:
        """For the row furthest behind, predicted from mode 0's acceptance; None before it is measured."""
        accepted = self.kept.get(("accepted", self.keys[0]))
        if not accepted or sum(accepted) == 0:
            return None
        depth = self.depths[mode]
        gained = sum(n * (length if depth is None else min(length, depth)) for length, n in enumerate(accepted))
        return 1 + gained / sum(accepted)

    def rate(self, mode: int) -> float:
        """Predicted tokens per second of the row furthest behind (``tokens_per_step`` over the measured cost)."""
        return self.tokens_per_step(mode) / max(self.kept[("cost", self.keys[mode])], 1e-12)

    def _choose(self) -> int:
        waiting = {self.pending[0]} if self.pending else set()
        unmeasured = [m for m, key in enumerate(self.keys) if ("cost", key) not in self.kept and m not in waiting]
        if unmeasured:
            return unmeasured[0]
        if self.tokens_per_step(0) is None:
            return 0
        best = max((m for m in range(len(self.keys)) if ("cost", self.keys[m]) in self.kept), key=self.rate)
        return 0 if best != 0 and 0 not in waiting and self._due(best) else best

    def _due(self, best: int) -> bool:
        """Whether mode 0 runs again: ``EXPLORE`` times the regret of its last round has passed since."""
        done = self.schedule
        regret = done["round"] * (1 - self.rate(0) / self.rate(best))
        return done["seconds"] - done["explored"] >= EXPLORE * regret

    def _record(self, mode: int, seconds: float, accepted: list[int]) -> None:
        key = ("cost", self.keys[mode])
        cost = seconds / ROUND_STEPS
        self.kept[key] = cost if key not in self.kept else (self.kept[key] + cost) / 2
        self.schedule["seconds"] += seconds
        if mode == 0:
            before = self.kept.get(("accepted", self.keys[0]), [0] * len(accepted))
            self.kept[("accepted", self.keys[0])] = [MEMORY * b + a for b, a in zip(before, accepted)]
            self.schedule.update(explored=self.schedule["seconds"], round=seconds)

    def _read_pending(self) -> None:
        if self.pending is not None:
            mode, start, end = self.pending
            seconds, accepted = self.clock.between(start, end)
            self._record(mode, seconds, accepted)
            self.pending = None

    def _start(self, mark) -> None:
        """A round of ``current``: warming first if this call has not run it; ``mark``, where the last round
        ended."""
        self.warm = 0 if self.current in self.warmed else WARM_STEPS
        self.steps = 0
        self.began = None if self.warm else mark if mark is not None else self.clock.mark()

    def stepped(self) -> None:
        if self.warm:
            self.warm -= 1
            if not self.warm:
                self.warmed.add(self.current)
                self.began = self.clock.mark()
            return
        self.steps += 1
        if self.steps < ROUND_STEPS:
            return
        end = self.clock.mark()
        self._read_pending()
        self.pending = (self.current, self.began, end)
        self.current = self._choose()
        self._start(end)

    def finish(self) -> None:
        """Reads the last full round (a partial one is left out); after the call's last step."""
        self._read_pending()
