"""The batch's token buffer: left-padded prompts followed by what each row has generated so far, and, for
drafters that read them, the target's feature at each column (the hidden state that predicted the next
token), kept alongside in the same layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    tokens: torch.Tensor  # (B, capacity) long; row b is valid in [start[b], end[b])
    start: torch.Tensor  # (B,) left padding of each row
    end: torch.Tensor  # (B,) one past each row's last token
    prompt_length: int  # padded prompt width: generation starts at this column in every row
    limit: int  # no row grows past this column (prompt width + max_new_tokens)
    finished: torch.Tensor  # (B,) bool
    features: torch.Tensor | None = None  # (B, capacity, H) once written; column c holds the target's f_c

    @classmethod
    def from_prompt(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    slack: int = 64) -> "Sequences":
        """Room for ``max_new_tokens`` and then ``slack`` or ``width`` columns (the most written at once before
        growing: a step's tree, or the prompt's features)."""
        batch, width = input_ids.shape
        tokens = input_ids.new_zeros(batch, width + max_new_tokens + max(slack, width))
        tokens[:, :width] = input_ids
        return cls(
            tokens=tokens,
            start=(attention_mask == 0).sum(1),
            end=torch.full((batch,), width, dtype=torch.long, device=input_ids.device),
            prompt_length=width,
            limit=width + max_new_tokens,
            finished=torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
        )

    @property
    def last(self) -> torch.Tensor:
        """(B,) each row's last token: the root of the next tree."""
        return self.tokens.gather(1, (self.end - 1)[:, None]).squeeze(1)

    @property
    def generated(self) -> torch.Tensor:
        return self.end - self.prompt_length

    def _reserve(self, width: int) -> None:
        """Room for ``width`` columns written from any column before ``limit``: a bound known on the host, so
        sizing the buffers never reads the device. When they grow they move, so a decoding step captured in a
        CUDA graph is keyed by their size (``generate.graph_key``)."""
        needed = self.limit + width
        capacity = self.tokens.shape[1]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity)
        self.tokens = torch.nn.functional.pad(self.tokens, (0, capacity - self.tokens.shape[1]))
        if self.features is not None:
            self.features = torch.nn.functional.pad(self.features, (0, 0, 0, capacity - self.features.shape[1]))

    def write_features(self, first: torch.Tensor, values: torch.Tensor, count: torch.Tensor) -> None:
        """Store ``values[b, :count[b]]`` (B, W, H) at columns ``first[b], first[b] + 1, ...``."""
        self._reserve(values.shape[1])
        if self.features is None:
            self.features = values.new_zeros(*self.tokens.shape, values.shape[-1])
        self._scatter(self.features, first, values, count)

    def append(self, new: torch.Tensor, count: torch.Tensor) -> None:
        """Write ``new[b, :count[b]]`` after each row's end (in place: a captured step keeps its buffers)."""
        self._reserve(new.shape[1])
        self._scatter(self.tokens, self.end, new, count)
        self.end += count

    @staticmethod
    def _scatter(buffer: torch.Tensor, first: torch.Tensor, values: torch.Tensor, count: torch.Tensor) -> None:
        steps = torch.arange(values.shape[1], device=values.device)
        cols = first[:, None] + steps
        keep = steps[None, :] < count[:, None]
        if buffer.dim() == 3:
            cols, keep = cols[..., None].expand_as(values), keep[..., None]
        buffer.scatter_(1, cols, torch.where(keep, values, buffer.gather(1, cols)))
