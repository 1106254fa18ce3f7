"""What ``generate`` returns: transformers' own output type, plus speculation statistics."""

from __future__ import annotations

from dataclasses import dataclass, fields

from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class Stats:
    """Counters of one ``generate`` call. τ counts the target's bonus token, as the literature does."""

    target_forwards: int = 0  # prefill chunks included
    draft_forwards: int = 0
    steps: int = 0  # verification steps
    plain_steps: int = 0  # steps with nothing drafted: every step without a drafter; under "auto", those it chose
    row_steps: int = 0  # sum over steps of the rows still generating
    drafted_tokens: int = 0  # valid drafted nodes offered to the verifier, over active rows
    accepted_tokens: int = 0  # drafted tokens the verifier accepted
    new_tokens: int = 0  # tokens emitted: the prompt pass's first, then accepted + bonus, cut at eos / max
    draft_seconds: float = 0.0  # drafting outside the step: 0 for the built-in drafters, which draft inside it
    verify_seconds: float = 0.0

    def __add__(self, other: "Stats") -> "Stats":
        """Counters of several calls together, so ``sum(stats, Stats())`` gives their pooled τ."""
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def tau(self) -> float:
        """Mean tokens gained per verification step per row: accepted drafts + 1."""
        return (self.accepted_tokens + self.row_steps) / max(self.row_steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / max(self.drafted_tokens, 1)

    def __str__(self) -> str:
        return (f"τ {self.tau:.2f} tokens per step, acceptance {self.acceptance_rate:.2f} "
                f"({self.accepted_tokens}/{self.drafted_tokens} drafted), {self.new_tokens} new tokens in "
                f"{self.steps} steps, {self.target_forwards} target forwards")

    def summary(self) -> dict:
        return {
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "steps": self.steps,
            "plain_steps": self.plain_steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "new_tokens": self.new_tokens,
            "tau": round(self.tau, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "draft_seconds": round(self.draft_seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
        }


@dataclass
class SpeculativeOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` with ``.stats``: a :class:`Stats`."""

    stats: Stats | None = None
