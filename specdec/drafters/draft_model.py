"""A smaller causal LM with the same vocabulary drafts a chain (``tree_width=1``) or a top-k tree."""

from __future__ import annotations

import functools

import torch

from .. import guard
from ..forward import Prefix, check_model, extend_chains, forward_nodes, prefill
from ..sampling import Sampling
from ..sequences import Sequences
from ..tree import Tree
from .base import FixedDepth, require_positive, run_now
from .levels import Levels, catch_up, resync


class DraftModel(FixedDepth):
    """Drafts ``num_draft_tokens`` levels with ``model``.

    Each level keeps the ``tree_width`` nodes with the highest draft probability of their path and gives
    each of them ``tree_width`` children: the most likely tokens when decoding greedily, i.i.d. samples
    from the draft's distribution when sampling (as SpecInfer's verification requires). Costs
    ``num_draft_tokens`` draft forward passes per step, whatever the width.

    The draft's KV cache holds exactly the row's accepted tokens: drafted nodes go past the length it is
    held at (the sequence limit) and are dropped after each step, and the accepted ones re-enter with the
    next step's first forward pass, as wide as the most tokens a row can have accepted. So nothing needs
    rolling back, that pass costs about what a one-token pass would, and nothing is measured on the host:
    ``propose`` is device work alone (``Drafter.drafts_in_step``), captured with verification on a GPU. The
    cache is the session's (``Drafter.kept``), so steps captured in an earlier call replay.
    """

    drafts_in_step = True

    def __init__(self, model, num_draft_tokens: int = 5, tree_width: int = 1):
        require_positive(num_draft_tokens=num_draft_tokens, tree_width=tree_width)
        model = check_model(model, "assistant_model")
        self.model = model
        self.num_draft_tokens = num_draft_tokens
        self.tree_width = tree_width

    @property
    def fixed_nodes(self) -> int:
        """The root, ``w`` children of the root, then ``w`` children for each of ``w`` nodes per level."""
        w = self.tree_width
        return 1 + w + (self.num_draft_tokens - 1) * w * w

    @property
    def forwards_per_step(self) -> int:
        return self.num_draft_tokens

    def check(self, target) -> None:
        ours = self.model.get_output_embeddings().weight.shape[0]
        theirs = target.get_output_embeddings().weight.shape[0]
        if ours != theirs:
            raise ValueError(
                f"`assistant_model` predicts {ours} tokens but the target predicts {theirs}; a draft model "
                f"must share the target's tokenizer and vocabulary size."
            )
        if self.model.device != target.device:
            raise ValueError(
                f"`assistant_model` is on {self.model.device} but the target is on {target.device}; "
                f"move both to the same device."
            )
        guard.prove(self.model, "assistant_model")

    @property
    def owner(self):
        return self.model

    def settings(self) -> tuple:
        return self.num_draft_tokens, self.tree_width

    def begin(self, target, seqs: Sequences, sampling: Sampling) -> None:
        super().begin(target, seqs, sampling)
        self.cache = self.kept_state().tree_cache(seqs)
        width = seqs.prompt_length
        self.forwards += prefill(self.model, self.cache, seqs.tokens[:, : width - 1], seqs.start)[0]
        self.cache.ends.fill_(width - 1)  # the draft's cached tokens end there
        self.cache.hold(seqs.limit)
        self.stepping = self.compiled(self.model)

    def resync(self, seqs: Sequences, replay=run_now) -> None:
        # To the root's column: the step's catch-up feeds the root.
        self.forwards += resync(*self._chains(seqs, lambda: seqs.end - 1), replay)

    def _chains(self, seqs: Sequences, end) -> tuple:
        """``catch_up``'s arguments to bring the draft's cache to column ``end`` (or ``resync``'s, ``end`` a function
        giving it): the draft over the rows' tokens."""
        last_col = seqs.tokens.shape[1] - 1
        return (functools.partial(self._forward, extend_chains), self.cache, seqs.start, end, self.num_draft_tokens + 1,
                lambda cols: seqs.tokens.gather(1, cols.clamp(max=last_col)))

    def _probs(self, logits, seqs: Sequences, depth) -> torch.Tensor:
        # Greedy drafting still needs the draft's full distribution to rank its top-k children.
        return self.sampling.probs(logits, seqs.generated[:, None] + depth, seqs.end[:, None] + depth)

    def _forward(self, fn, *args):
        return fn(self.stepping, self.cache, *args)

    @torch.no_grad()
    def propose(self, seqs: Sequences) -> Tree:
        batch, dev, w = seqs.end.shape[0], seqs.end.device, self.tree_width
        # Catch up on the tokens accepted since the last step (the root included): a whole path of the last
        # tree and its bonus token at most (2 tokens after the prompt), none once a row has finished.
        logits, last = catch_up(*self._chains(seqs, seqs.end))
        frontier_probs = self._probs(logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1])), seqs, 0)
        tokens = [seqs.last[:, None]]
        parents = [torch.full((batch, 1), -1, device=dev)]
        probs = [torch.zeros_like(frontier_probs)]
        logp = [torch.zeros(batch, 1, device=dev)]
        frontier = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # nodes to expand, by index
        levels = Levels(functools.partial(self._forward, forward_nodes), self.cache, Prefix(seqs.start, seqs.end),
                        (seqs.end - 1 - seqs.start)[:, None])
        fed_parents = None  # the fed nodes' parents among the level fed before them (None: the root)
        n_nodes = 1
        for level in range(1, self.num_draft_tokens + 1):
            kids = self.sampling.children(frontier_probs, w)  # (B, F, w)
            k = kids.shape[1] * w
            kid_logp = (frontier_probs.gather(-1, kids).clamp(min=1e-30).log()
                        + torch.cat(logp, 1).gather(1, frontier)[..., None])
            tokens.append(kids.reshape(batch, k))
            parents.append(frontier[..., None].expand(-1, -1, w).reshape(batch, k))
            probs.append(frontier_probs[:, :, None].expand(-1, -1, w, -1).reshape(batch, k, -1))
            logp.append(kid_logp.reshape(batch, k))
            if level == self.num_draft_tokens:
                break
            # Expand the `w` most probable new nodes next.
            best = logp[-1].topk(min(w, k), dim=-1).indices
            frontier = n_nodes + best
            n_nodes += k
            frontier_probs = self._probs(levels.feed(tokens[-1].gather(1, best), fed_parents), seqs, level)
            fed_parents = best // w
        return Tree.drafted(torch.cat(tokens, 1), torch.cat(parents, 1), seqs.finished,
                            torch.cat(probs, 1) if self.sampling.do_sample else None,
                            max_depth=self.num_draft_tokens, max_children=w)
