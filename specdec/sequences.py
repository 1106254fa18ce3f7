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
    finished: torch.Tensor  # (B,) bool
    # The padded prompt width and the column rows stop at (prompt width + max_new_tokens), on the device: a
    # step captured in a CUDA graph reads them there, so it serves the next call's prompt too.
    first_new: torch.Tensor  # () long
    stop: torch.Tensor  # () long
    prompt_length: int  # the same width on the host, for work outside the step
    limit: int  # no row grows past this column (at least ``stop``): buffers and held caches are sized for it
    features: torch.Tensor | None = None  # (B, capacity, H) once written; column c holds the target's f_c

    @classmethod
    def empty(cls, batch: int, limit: int, device, slack: int = 64) -> "Sequences":
        """Buffers for rows that end by column ``limit``, with ``slack`` columns more: the most one step
        writes past a row's end before the buffers grow."""
        long = dict(dtype=torch.long, device=device)
        return cls(
            tokens=torch.zeros(batch, limit + slack, **long),
            start=torch.zeros(batch, **long),
            end=torch.zeros(batch, **long),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            first_new=torch.zeros((), **long),
            stop=torch.zeros((), **long),
            prompt_length=0,
            limit=limit,
        )

    @classmethod
    def from_prompt(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> "Sequences":
        seqs = cls.empty(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, input_ids.device)
        seqs.fill(input_ids, attention_mask, max_new_tokens)
        return seqs

    def fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
        """Start over from a new prompt, in place: the buffers stay where a captured step recorded them."""
        width = input_ids.shape[1]
        if input_ids.shape[0] != self.tokens.shape[0] or width + max_new_tokens > self.limit:
            raise ValueError(f"Sequences for {self.tokens.shape[0]} rows up to column {self.limit} cannot hold "
                             f"{tuple(input_ids.shape)} prompts and {max_new_tokens} new tokens.")
        self.tokens.zero_()
        self.tokens[:, :width] = input_ids
        self.start.copy_((attention_mask == 0).sum(1))
        self.end.fill_(width)
        self.finished.zero_()
        self.first_new.fill_(width)
        self.stop.fill_(width + max_new_tokens)
        self.prompt_length = width

    @property
    def last(self) -> torch.Tensor:
        """(B,) each row's last token: the root of the next tree."""
        return self.tokens.gather(1, (self.end - 1)[:, None]).squeeze(1)

    @property
    def generated(self) -> torch.Tensor:
        return self.end - self.first_new

    def _reserve(self, width: int) -> None:
        """Room for ``width`` columns written from any column before ``limit``: a bound known on the host, so
        sizing the buffers never reads the device. When they grow they move, so a decoding step captured in a
        CUDA graph is keyed by their size (``Session.sizes``)."""
        needed = self.limit + width
        capacity = self.tokens.shape[1]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity)
        self.tokens = torch.nn.functional.pad(self.tokens, (0, capacity - self.tokens.shape[1]))
        if self.features is not None:
            self.features = torch.nn.functional.pad(self.features, (0, 0, 0, capacity - self.features.shape[1]))

    def write_prompt_features(self, values: torch.Tensor) -> None:
        """Store the prompt's features ``values`` (B, prompt width, H) in columns ``[0, width)``, in the
        buffer an earlier call left if it fits."""
        shape = (*self.tokens.shape, values.shape[-1])
        if self.features is None or self.features.shape != shape or self.features.dtype != values.dtype:
            self.features = values.new_zeros(shape)
        self.features[:, : values.shape[1]] = values

    def write_features(self, first: torch.Tensor, values: torch.Tensor, count: torch.Tensor) -> None:
        """Store ``values[b, :count[b]]`` (B, W, H) at columns ``first[b], first[b] + 1, ...``, after the prompt's."""
        self._reserve(values.shape[1])
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
