"""An EAGLE-style head: one decoder layer of the target's own architecture that runs autoregressively on
the target's features, and drafts a dynamic tree as EAGLE-2 does.

At cache column c the head reads the pair (feature f_c, embedding of token x_{c+1}) through a linear
``fc`` and predicts the next feature f_{c+1}, which the target's own LM head reads out as the
distribution of x_{c+2}. The decoder layer is built by transformers from the target's config (one
layer, full attention), so the head runs through the same cache, mask and kernel path as any model; the
target's embedding and LM head are borrowed, not copied.

Drafting (EAGLE-2): the pair ending at the root gives the first level; each level expands the ``top_k``
best nodes by cumulative log-probability, each with its ``top_k`` most likely children, and feeds them
with the features the head predicted for their parents. All candidates are ranked at the end and the
best ``total_tokens`` form the tree; a child never outranks its parent, so the kept set is a tree.

When sampling, each expanded node's children are ``top_k`` i.i.d. samples from the head's distribution
(warped as the target's is), which SpecInfer's verification needs to accept them with probability
min(1, p/q). Ranking single candidates by their own sampled values would bias which siblings remain, so
the final cut keeps whole sibling groups, ordered by their parent's score (and a prefix, in sample order,
of the last group that fits).
"""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from specdec import features
from specdec.drafters.base import Drafter, require_positive, run_now
from specdec.drafters.levels import Levels, catch_up, resync
from specdec.forward import Prefix, extend_chains, forward_nodes, prefill
from specdec.sampling import Sampling, top_k
from specdec.sequences import Sequences
from specdec.tree import Tree

from .target import Borrowed, check_device, check_fingerprint, feature_size, fingerprint


def decoder_config(config):
    """The target's config cut to one full-attention layer, with a one-token vocabulary: the embedding and
    LM head are the target's, borrowed, so building vocabulary-sized ones (gigabytes for a large model) would
    only be thrown away."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    config.vocab_size, config.pad_token_id = 1, None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"]
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if getattr(config, "use_sliding_window", False):
        config.use_sliding_window = False
    return config


class EagleHead(nn.Module):
    kind = "eagle"

    def __init__(self, target):
        super().__init__()
        self.options = {}
        self.target_fingerprint = fingerprint(target)
        embed = target.get_input_embeddings()
        self.decoder = AutoModelForCausalLM.from_config(decoder_config(target.config))
        self.decoder.set_input_embeddings(Borrowed(embed))
        self.decoder.set_output_embeddings(Borrowed(target.get_output_embeddings()))
        self.fc = nn.Linear(feature_size(target) + embed.weight.shape[1], embed.weight.shape[1])
        self.decoder.eval()
        self.to(target.device, target.dtype)

    def inputs(self, feats: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings for pairs (f_c, x_{c+1}): (B, Q, H) and (B, Q) -> (B, Q, E)."""
        embeds = self.decoder.get_input_embeddings()(next_tokens)
        return self.fc(torch.cat([feats.to(embeds.dtype), embeds], dim=-1))

    def forward(self, feats, next_tokens, position_ids=None, attention_mask=None):
        """Teacher-forced pass over whole sequences (training): returns (predicted features, logits),
        both (B, Q, ...), for f_{c+1} and x_{c+2}."""
        with features.capture(self.decoder) as captured:
            logits = self.decoder(inputs_embeds=self.inputs(feats, next_tokens), position_ids=position_ids,
                                  attention_mask=attention_mask).logits
        return captured[0], logits


class _Pool(NamedTuple):
    """EAGLE's candidates, one tensor per level: tokens and parents (pool indices, 0 the root) (B, n), scores
    (B, n) float64, and when sampling each candidate's draft distribution (B, n, V)."""

    tokens: list[torch.Tensor]
    parents: list[torch.Tensor]
    scores: list[torch.Tensor]
    q: list[torch.Tensor] | None


class Eagle(Drafter):
    """``propose`` is device work alone (``Drafter.drafts_in_step``), captured with verification on a GPU: the
    head's first pass is as wide as the most pairs a row can have gained since the last step, and its cache
    is held at the sequence limit, with each level's nodes fed past it and dropped after the step."""

    wants_features = True
    drafts_in_step = True

    def __init__(self, head: EagleHead, top_k: int = 8, depth: int = 5, total_tokens: int = 48):
        require_positive(top_k=top_k, depth=depth, total_tokens=total_tokens)
        self.head = head
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens

    @property
    def fixed_nodes(self) -> int:
        """The root and the best ``total_tokens`` of the pool: ``top_k`` children of the root, then ``top_k``
        children for each of ``top_k`` nodes per further level."""
        return 1 + min(self.total_tokens, self.top_k + (self.depth - 1) * self.top_k**2)

    @property
    def forwards_per_step(self) -> int:
        return self.depth

    def check(self, target) -> None:
        check_fingerprint(self.head.target_fingerprint, target, "This EAGLE head")
        check_device(self.head, target)

    @property
    def owner(self):
        return self.head

    def settings(self) -> tuple:
        return self.top_k, self.depth, self.total_tokens

    def begin(self, target, seqs: Sequences, sampling: Sampling) -> None:
        super().begin(target, seqs, sampling)
        self.cache = self.kept_state().tree_cache(seqs)
        # Pairs (f_c, x_{c+1}) for every column whose feature is known, except the last: propose feeds it.
        width = max(seqs.prompt_length - 2, 0)
        self.cache.ends.fill_(width)  # the pairs cached end there
        if width:
            pairs = self.head.inputs(seqs.features[:, :width], seqs.tokens[:, 1 : width + 1])
            self.forwards += prefill(self.head.decoder, self.cache, pairs, seqs.start)[0]
        self.cache.hold(seqs.limit)
        self.stepping = self.compiled(self.head.decoder)
        # The tree's construction between the head's passes, compiled as they are: a few fused kernels, not
        # dozens per level. Unbound, so that the smaller shapes (copies) run it with their own sizes.
        self.root_level, self.next_level, self.cut = map(self.compiled, (Eagle._root_level, Eagle._next_level,
                                                                         Eagle._cut))

    def _run(self, fn, *args):
        with features.capture(self.head.decoder) as captured:
            logits = fn(self.stepping, self.cache, *args)
        return logits.float(), captured[0]

    def _children(self, logits, seqs: Sequences, depth: int):
        """Each node's ``top_k`` children (B, F, k), their log-probabilities, and the distribution they were
        drawn from (B, F, V) when sampling (None when greedy: the most likely tokens, deterministic)."""
        if not self.sampling.do_sample:
            # Selected in fp32 (exact in float64 afterwards): a float64 top-k over the vocabulary took 0.65 of
            # a 4.3 ms step on an H100 (benchmarks/profile_step.py).
            values, kids = top_k(logits.log_softmax(-1).clamp(min=-1e4), self.top_k)
            return kids, values.double(), None
        q = self.sampling.probs(logits, seqs.generated[:, None] + depth, seqs.end[:, None] + depth)
        kids = self.sampling.children(q, self.top_k)
        return kids, q.gather(-1, kids).clamp(min=1e-30).log().double(), q

    @torch.no_grad()
    def propose(self, seqs: Sequences) -> Tree:
        logits, feats = self._catch_up(seqs)
        return self.cut(self, seqs, self._grow(seqs, logits, feats))

    @property
    def max_depth(self) -> int:
        return self.depth

    def shapes(self) -> list[Drafter]:
        """This tree, and one with a quarter of its nodes, half its width and half its depth."""
        small = dict(top_k=max(1, self.top_k // 2), depth=max(1, (self.depth + 1) // 2),
                     total_tokens=max(1, self.total_tokens // 4))
        same = small == dict(top_k=self.top_k, depth=self.depth, total_tokens=self.total_tokens)
        return [self] + ([] if same else [self.reshaped(**small)])

    def resync(self, seqs: Sequences, replay=run_now) -> None:
        # To the root's pair: the step's catch-up feeds it.
        self.forwards += resync(*self._pairs(seqs, lambda: seqs.end - 2), replay)

    def _pairs(self, seqs: Sequences, end) -> tuple:
        """``catch_up``'s arguments to bring the head's cache to pair column ``end`` (or ``resync``'s, ``end`` a
        function giving it): pairs (f_c, x_{c+1})."""
        def pairs(cols):
            cols = cols.clamp(max=seqs.end.max() - 2)
            return self.head.inputs(seqs.features.gather(1, cols[..., None].expand(-1, -1, seqs.features.shape[-1])),
                                    seqs.tokens.gather(1, cols + 1))

        return functools.partial(self._run, extend_chains), self.cache, seqs.start, end, self.depth + 1, pairs

    def _catch_up(self, seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over the pairs whose features the last verification produced, the root's last: at most a
        whole path of the last tree and its bonus token (2 after the prompt), none once a row has finished.
        Returns the logits (B, 1, V) and predicted feature (B, 1, H) at the root's pair."""
        (logits, feats), last = catch_up(*self._pairs(seqs, seqs.end - 1))
        at = last[..., None]
        return logits.gather(1, at.expand(-1, -1, logits.shape[-1])), feats.gather(1, at.expand(-1, -1, feats.shape[-1]))

    def _grow(self, seqs: Sequences, root_logits: torch.Tensor, root_feats: torch.Tensor) -> _Pool:
        """The candidate pool, level by level: each level feeds the ``top_k`` best nodes so far and ranks their
        children. Between the head's passes, ``_root_level`` and ``_next_level`` (compiled with the passes)."""
        pool, frontier, inputs = self.root_level(self, seqs, root_logits, root_feats)
        fed_parents = None  # each frontier node's parent among the last level fed (None: the root)
        levels = Levels(functools.partial(self._run, forward_nodes), self.cache, Prefix(seqs.start, seqs.end - 1),
                        (seqs.end - 2 - seqs.start)[:, None])
        for level in range(1, self.depth):
            logits, feats = levels.feed(inputs, fed_parents)
            pool, frontier, fed_parents, inputs = self.next_level(self, seqs, level, logits, feats, pool, frontier)
        return pool

    def _root_level(self, seqs: Sequences, logits: torch.Tensor, feats: torch.Tensor) -> tuple:
        """The root's ``top_k`` children, as the pool's first level and the first frontier (pool indices), and
        the frontier's inputs to the head."""
        batch, dev, k = seqs.end.shape[0], seqs.end.device, self.top_k
        kids, kid_logp, q = self._children(logits, seqs, 0)
        # Scores in float64, so the small depth penalty always breaks parent-child ties in the parent's favour.
        pool = _Pool([kids[:, 0]], [torch.zeros_like(kids[:, 0])], [kid_logp[:, 0]],
                     None if q is None else [q.expand(-1, k, -1)])
        frontier = torch.arange(1, k + 1, device=dev).expand(batch, -1)
        return pool, frontier, self._inputs(seqs, pool, frontier, feats.expand(-1, k, -1))

    def _next_level(self, seqs: Sequences, level: int, logits: torch.Tensor, feats: torch.Tensor, pool: _Pool,
                    frontier: torch.Tensor) -> tuple:
        """The children of ``frontier`` (B, k), fed as ``logits`` and ``feats`` (B, k, ...), into the pool; the
        best ``top_k`` of them are the next frontier. Returns the pool, the frontier, its parents among the
        nodes just fed, and its inputs to the head (None after the last level)."""
        k = self.top_k
        size = 1 + sum(scores.shape[1] for scores in pool.scores)
        kids, kid_logp, q = self._children(logits, seqs, level)  # (B, k, k)
        scores = torch.cat([torch.zeros_like(pool.scores[0][:, :1])] + pool.scores, 1)
        kid_scores = (scores.gather(1, frontier)[..., None] + kid_logp - 1e-6).flatten(1)
        pool = _Pool(pool.tokens + [kids.flatten(1)],
                     pool.parents + [frontier[..., None].expand(-1, -1, k).flatten(1)],
                     pool.scores + [kid_scores],
                     None if q is None else pool.q + [q[:, :, None].expand(-1, -1, k, -1).flatten(1, 2)])
        if level == self.depth - 1:
            return pool, None, None, None
        best = kid_scores.topk(k, dim=-1).indices
        frontier, fed_parents = size + best, best // k
        parent_feats = feats.gather(1, fed_parents[..., None].expand(-1, -1, feats.shape[-1]))
        return pool, frontier, fed_parents, self._inputs(seqs, pool, frontier, parent_feats)

    def _inputs(self, seqs: Sequences, pool: _Pool, frontier: torch.Tensor, parent_feats: torch.Tensor):
        """The head's inputs for the ``frontier`` nodes: their tokens with their parents' predicted features."""
        tokens = torch.cat([seqs.last[:, None]] + pool.tokens, 1)
        return self.head.inputs(parent_feats, tokens.gather(1, frontier))

    def _cut(self, seqs: Sequences, pool: _Pool) -> Tree:
        """The best ``total_tokens`` candidates (whole sibling groups when sampling) as the tree."""
        batch, dev, k = seqs.end.shape[0], seqs.end.device, self.top_k
        tokens = torch.cat(pool.tokens, 1)
        scores = torch.cat(pool.scores, 1)
        parents = torch.cat(pool.parents, 1)
        size = 1 + scores.shape[1]
        n_keep = min(self.total_tokens, scores.shape[1])
        if pool.q is None:
            keep = scores.topk(n_keep, dim=-1).indices
        else:  # whole sibling groups (k consecutive pool entries), best parent first; see the module docstring
            parent_scores = torch.cat([torch.zeros_like(scores[:, :1]), scores], 1).gather(1, parents[:, ::k])
            group_rank = parent_scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            slot = (group_rank[..., None] * k + torch.arange(k, device=dev)).flatten(1)  # place in that order
            keep = slot.argsort(dim=-1)[:, :n_keep]
        keep = keep.sort(dim=-1).values
        # Pool index order is topological, so sorted kept indices are too; renumber parents into the tree.
        new_index = torch.zeros(batch, size, dtype=torch.long, device=dev)
        new_index.scatter_(1, keep + 1, torch.arange(1, keep.shape[1] + 1, device=dev).expand(batch, -1))
        tree_parents = new_index.gather(1, parents.gather(1, keep))
        draft_probs = None
        if pool.q is not None:
            kept_q = torch.cat(pool.q, 1).gather(1, keep[..., None].expand(-1, -1, pool.q[0].shape[-1]))
            draft_probs = torch.cat([torch.zeros_like(kept_q[:, :1]), kept_q], 1)
        return Tree.drafted(torch.cat([seqs.last[:, None], tokens.gather(1, keep)], 1),
                            torch.cat([torch.full((batch, 1), -1, device=dev), tree_parents], 1), seqs.finished,
                            draft_probs, max_depth=self.depth, max_children=k)
