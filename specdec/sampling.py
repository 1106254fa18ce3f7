"""Turning logits into the distribution transformers' ``generate`` would sample from, at every tree node.

The same processing is applied to the target (to verify) and to a draft model (to propose), so that the
draft's proposal distribution q is comparable to the target's p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

SLICE = 1024  # the vocabulary slice one block of ``top_k``'s first stage ranks


def top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.topk(k, dim=-1)`` (sorted values, their indices; among equal values any may be taken), in two
    stages over a long last dimension: the ``k`` best of each ``SLICE``-wide slice, then the ``k`` best of those.
    ``torch.topk`` gives a row one thread block, so a step's few vocabulary-long rows left the GPU idle: 86 µs
    per call for EAGLE's 8 frontier rows over 16,384 tokens (H200, docs/results/issue20-2026-12-02/
    profile-compiled.json); sliced, every block has a short row."""
    width = values.shape[-1]
    if width <= 2 * SLICE or k > SLICE:
        return values.topk(k, dim=-1)
    slices = -(-width // SLICE)
    padded = torch.nn.functional.pad(values, (0, slices * SLICE - width), value=float("-inf"))
    best, index = padded.unflatten(-1, (slices, SLICE)).topk(k, dim=-1)  # (..., slices, k)
    index = index + torch.arange(0, slices * SLICE, SLICE, device=values.device)[:, None]
    best, pick = best.flatten(-2).topk(k, dim=-1)
    return best, index.flatten(-2).gather(-1, pick)


# Options of transformers' generate that change the output and that this engine does not implement.
# Their defaults, as transformers resolves them; anything else is refused rather than silently ignored.
UNSUPPORTED_DEFAULTS = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "stop_strings": None,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}


@dataclass(frozen=True)
class Sampling:
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_token_ids: tuple[int, ...]
    min_new_tokens: int
    min_length: int

    @classmethod
    def from_config(cls, config) -> "Sampling":
        for name, default in UNSUPPORTED_DEFAULTS.items():
            value = getattr(config, name, default)
            if value is not None and value != default:
                raise ValueError(
                    f"`{name}={value!r}` is not supported by speculative decoding; leave it at {default!r}."
                )
        eos = config.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            do_sample=bool(config.do_sample),
            temperature=float(config.temperature if config.temperature is not None else 1.0),
            top_k=config.top_k,
            top_p=config.top_p,
            eos_token_ids=eos,
            min_new_tokens=config.min_new_tokens or 0,
            min_length=config.min_length or 0,
        )

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where ``tokens`` are eos. The ids stay Python ints (a handful at most), so nothing is copied from
        the host: a step captured in a CUDA graph may not, and a compiled one folds them in as constants."""
        found = torch.zeros_like(tokens, dtype=torch.bool)
        for eos in self.eos_token_ids:
            found |= tokens == eos
        return found

    def _scores(self, logits, new_tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """fp32 logits with eos forbidden where the minimum length is not reached yet."""
        scores = logits.float()
        if self.eos_token_ids:
            too_short = (new_tokens < self.min_new_tokens) | (length < self.min_length)
            for eos in self.eos_token_ids:
                scores[..., eos].masked_fill_(too_short, -float("inf"))
        return scores

    def probs(self, logits, new_tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Distribution of the next token after each node, as transformers' generate defines it.

        ``logits`` (B, N, V); ``new_tokens`` (B, N): tokens generated before the one predicted at each node;
        ``length`` (B, N): the same counted as transformers counts ``input_ids.shape[-1]`` (padded prompt
        + generated), for ``min_length``. Greedy decoding gives the unwarped softmax, whose argmax is
        ``greedy_tokens``' token (drafters rank their children by it).
        """
        scores = self._scores(logits, new_tokens, length)
        if not self.do_sample:
            return scores.softmax(-1)
        shape = scores.shape
        flat = scores.reshape(-1, shape[-1])
        if self.temperature != 1.0:
            flat = TemperatureLogitsWarper(self.temperature)(None, flat)
        if self.top_k:
            flat = TopKLogitsWarper(top_k=self.top_k)(None, flat)
        if self.top_p is not None and self.top_p < 1.0:
            flat = TopPLogitsWarper(top_p=self.top_p)(None, flat)
        return flat.softmax(-1).reshape(shape)

    def children(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` children for each distribution in ``probs`` (..., V): the ``k`` most likely tokens when greedy,
        ``k`` i.i.d. draws when sampling, as SpecInfer's verification of sibling drafts requires."""
        if not self.do_sample:  # top-1 as an argmax: a reduction, not a radix select over the vocabulary
            return probs.argmax(-1, keepdim=True) if k == 1 else top_k(probs, k)[1]
        return self.draw(probs.unsqueeze(-2).expand(*probs.shape[:-1], k, probs.shape[-1]))

    @staticmethod
    def draw(probs: torch.Tensor) -> torch.Tensor:
        """One token from each distribution in ``probs`` (..., V), as ``torch.multinomial`` would draw it
        (argmax of p / Exp(1) noise picks index i with probability p_i), but with no check that reads the
        device, so it can run inside a CUDA graph."""
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)

    def greedy_tokens(self, logits, new_tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """(B, N): the token greedy decoding picks after each node (arguments as for ``probs``)."""
        return self._scores(logits, new_tokens, length).argmax(-1)
