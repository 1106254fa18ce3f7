"""A smaller causal LM with the same vocabulary drafts a chain (``tree_width=1``) or a top-k tree."""

from __future__ import annotations

import torch

from ..forward import Prefix, check_model, extend_chains, forward_nodes, prefill
from ..graphs import addresses
from ..sampling import Sampling
from ..sequences import Sequences
from ..tree import Tree
from .base import Drafter, require_positive


class DraftModel(Drafter):
    """Drafts ``num_draft_tokens`` levels with ``model``.

    Each level keeps the ``tree_width`` nodes with the highest draft probability of their path and gives
    each of them ``tree_width`` children: the most likely tokens when decoding greedily, i.i.d. samples
    from the draft's distribution when sampling (as SpecInfer's verification requires). Costs
    ``num_draft_tokens`` draft forward passes per step, whatever the width.

    The draft's KV cache holds exactly the row's accepted tokens: drafted nodes go past the length it is
    held at (the sequence limit) and are dropped after each step, and the accepted ones re-enter with the
    next step's first forward pass, as wide as the most tokens a row can have accepted. So nothing needs
    rolling back, that pass costs about what a one-token pass would, and nothing is measured on the host:
    ``propose`` is device work alone (``Drafter.fixed_nodes``), captured with verification on a GPU. The
    cache is the one ``model`` kept from its last call (``Drafter.kept_cache``), so steps captured then replay.
    """

    def __init__(self, model, num_draft_tokens: int = 5, tree_width: int = 1):
        require_positive(num_draft_tokens=num_draft_tokens, tree_width=tree_width)
        check_model(model, "assistant_model")
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

    def begin(self, target, seqs: Sequences, sampling: Sampling) -> None:
        super().begin(target, seqs, sampling)
        self.cache = self.kept_cache(self.model, seqs)
        width = seqs.prompt_length
        self.forwards += prefill(self.model, self.cache, seqs.tokens[:, : width - 1], seqs.start)[0]
        self.cache.ends.fill_(width - 1)  # the draft's cached tokens end there
        self.cache.hold(seqs.limit)

    def graph_key(self) -> tuple:
        return "draft model", self.num_draft_tokens, self.tree_width, addresses(self.model, self.cache.tensors())

    def _probs(self, logits, seqs: Sequences, depth) -> torch.Tensor:
        # Greedy drafting still needs the draft's full distribution to rank its top-k children.
        return self.sampling.probs(logits, seqs.generated[:, None] + depth, seqs.end[:, None] + depth)

    @torch.no_grad()
    def propose(self, seqs: Sequences) -> Tree:
        batch, dev, w = seqs.end.shape[0], seqs.end.device, self.tree_width
        rows = torch.arange(batch, device=dev)

        # Catch up on the tokens accepted since the last step (the root included): a whole path of the last
        # tree and its bonus token at most (2 tokens after the prompt), none once a row has finished.
        cached_end = self.cache.ends
        count = seqs.end - cached_end
        new = torch.arange(self.num_draft_tokens + 1, device=dev)
        cols = (cached_end[:, None] + new).clamp(max=seqs.tokens.shape[1] - 1)
        logits = extend_chains(self.model, self.cache, seqs.tokens.gather(1, cols), count,
                               Prefix(seqs.start, cached_end))
        cached_end.copy_(seqs.end)

        root_probs = self._probs(logits[rows, count - 1][:, None], seqs, 0)  # (B, 1, V)
        tokens = [seqs.last[:, None]]
        parents = [torch.full((batch, 1), -1, device=dev)]
        probs = [torch.zeros_like(root_probs)]
        logp = [torch.zeros(batch, 1, device=dev)]
        frontier = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # nodes to expand, by index
        frontier_probs = root_probs
        fed = []  # per level, the node indices fed to the draft, in cache order after the held length
        root_pos = (seqs.end - 1 - seqs.start)[:, None]
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
            level_ids = n_nodes + torch.arange(k, device=dev)
            n_nodes += k
            if level == self.num_draft_tokens:
                break
            # Expand the `w` most probable new nodes next.
            best = logp[-1].topk(min(w, k), dim=-1).indices
            frontier = level_ids[best]
            tree = Tree(torch.cat(tokens, 1), torch.cat(parents, 1), torch.ones(batch, n_nodes, dtype=torch.bool, device=dev))
            fed.append(frontier)
            fed_ids = torch.cat(fed, 1)
            fed_depth = torch.cat([torch.full_like(ids, d) for d, ids in enumerate(fed, start=1)], 1)
            visible = tree.ancestors[rows[:, None], frontier].gather(
                2, fed_ids[:, None, :].expand(-1, frontier.shape[1], -1))
            # Every frontier node sits at depth `level`: one position per row, no per-node gather.
            with self.cache.held_past(fed_ids.shape[1] - frontier.shape[1]):
                logits = forward_nodes(
                    self.model, self.cache, tree.tokens.gather(1, frontier), (root_pos + level).expand_as(frontier),
                    Prefix(seqs.start, seqs.end), visible, root_pos + fed_depth,
                )
            frontier_probs = self._probs(logits, seqs, level)

        return Tree.drafted(torch.cat(tokens, 1), torch.cat(parents, 1), seqs.finished,
                            torch.cat(probs, 1) if self.sampling.do_sample else None,
                            max_depth=self.num_draft_tokens, max_children=w)
