"""The batch's token buffer: left-padded prompts followed by what each row has generated so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    tokens: torch.Tensor  # (B, capacity) long; row b is valid in [start[b], end[b])
    start: torch.Tensor  # (B,) left padding of each row
    end: torch.Tensor  # (B,) one past each row's last token
    prompt_length: int  # padded prompt width: generation starts at this column in every row
    finished: torch.Tensor  # (B,) bool

    @classmethod
    def from_prompt(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int) -> "Sequences":
        batch, width = input_ids.shape
        tokens = input_ids.new_zeros(batch, max(capacity, width))
        tokens[:, :width] = input_ids
        return cls(
            tokens=tokens,
            start=(attention_mask == 0).sum(1),
            end=torch.full((batch,), width, dtype=torch.long, device=input_ids.device),
            prompt_length=width,
            finished=torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
        )

    @property
    def last(self) -> torch.Tensor:
        """(B,) each row's last token: the root of the next tree."""
        return self.tokens.gather(1, (self.end - 1)[:, None]).squeeze(1)

    @property
    def generated(self) -> torch.Tensor:
        return self.end - self.prompt_length

    def append(self, new: torch.Tensor, count: torch.Tensor) -> None:
        """Write ``new[b, :count[b]]`` after each row's end."""
        width = new.shape[1]
        needed = int((self.end + width).max())
        if needed > self.tokens.shape[1]:
            grown = self.tokens.new_zeros(self.tokens.shape[0], max(needed, 2 * self.tokens.shape[1]))
            grown[:, : self.tokens.shape[1]] = self.tokens
            self.tokens = grown
        cols = self.end[:, None] + torch.arange(width, device=new.device)
        keep = torch.arange(width, device=new.device)[None, :] < count[:, None]
        current = self.tokens.gather(1, cols)
        self.tokens.scatter_(1, cols, torch.where(keep, new, current))
        self.end = self.end + count

    def row(self, b: int) -> torch.Tensor:
        return self.tokens[b, self.start[b] : self.end[b]]
