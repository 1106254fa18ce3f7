"""``speculation="auto"``: which drafting shape, or plain decoding, each stretch of a call runs, chosen from the
throughput measured while it runs.

Terms:

- *mode*: one way to run a step. A call's modes are the drafter as given, plain decoding (the verifier over
  the root alone, nothing drafted), then the smaller shapes the drafter offers (``Drafter.shapes``).
- *round*: ``ROUND_STEPS`` consecutive steps in one mode, timed from one wait for the device to the next. Its
  *rate* is the new tokens it gave per second of wall time, host included: what every choice compares. A
  mode's first round in a call starts after ``WARM_STEPS`` untimed steps, which capture its graphs and
  compile it, and are real steps all the same.
- *key*: what a mode's rate is kept under (its recipe, see ``generate``), so that a later call in a kept
  session starts from the rates an earlier one measured.

Each mode never measured runs one round, in order; then the mode with the best rate runs. Rates drift as
rows finish, the cache grows and the text turns more or less predictable, so a mode that is not the best is
measured again ``EXPLORE_EVERY`` rounds after its last measurement, and each time it still loses, twice as
long after (at most ``MAX_WAIT`` rounds): a mode that keeps losing costs less and less. A rate is the mean
of its last measurement and the one before.

Lossless whatever it picks: a plain step verifies a tree with nothing drafted, and each choice depends on
steps already run, never on what a later step samples. Seeded sampling therefore stays exact in distribution,
but which steps draft follows the timing, so two runs with one seed may sample different text;
``speculation="always"`` makes them repeat.
"""

from __future__ import annotations

from typing import Callable, Hashable

ROUND_STEPS = 16
WARM_STEPS = 2
EXPLORE_EVERY = 8
MAX_WAIT = 128


class Speculation:
    """Chooses the mode of each step. ``keys`` (one per mode, in exploration order), ``rates`` (key -> tokens
    per second, kept by the caller across calls), ``clock()`` waits for the device and returns (seconds, new
    tokens so far). The loop reads ``current`` before each step and calls ``stepped()`` after queueing it."""

    def __init__(self, keys: list[Hashable], rates: dict, clock: Callable[[], tuple[float, int]]):
        self.keys, self.rates, self.clock = keys, rates, clock
        self.wait = [EXPLORE_EVERY] * len(keys)  # rounds until a mode that is not the best is measured again
        self.due = list(self.wait)  # the round at which it is
        self.warmed: set[int] = set()
        self.rounds = 0
        self.current = self._choose()
        self._start(None)

    def _best(self) -> int:
        return max(range(len(self.keys)), key=lambda m: self.rates[self.keys[m]])

    def _choose(self) -> int:
        unmeasured = [m for m, key in enumerate(self.keys) if key not in self.rates]
        if unmeasured:
            return unmeasured[0]
        best = self._best()
        due = [m for m in range(len(self.keys)) if m != best and self.due[m] <= self.rounds]
        return min(due, key=lambda m: self.due[m]) if due else best

    def _record(self, mode: int, rate: float) -> None:
        key = self.keys[mode]
        self.rates[key] = rate if key not in self.rates else (self.rates[key] + rate) / 2
        losing = all(key in self.rates for key in self.keys) and self._best() != mode
        self.wait[mode] = min(2 * self.wait[mode], MAX_WAIT) if losing else EXPLORE_EVERY
        self.due[mode] = self.rounds + self.wait[mode]

    def _start(self, now: tuple[float, int] | None) -> None:
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
        self._record(self.current, (now[1] - self.began[1]) / max(now[0] - self.began[0], 1e-9))
        self.rounds += 1
        self.current = self._choose()
        self._start(now)
