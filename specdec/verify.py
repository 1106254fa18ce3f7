"""Accept the longest valid root path of a drafted tree, losslessly.

One rule serves greedy and sampling. At an accepted node with target distribution p, the children are tried
in order: a child with token x drawn from q is accepted with probability min(1, p(x)/q(x)); on rejection p
becomes norm(max(p - q, 0)) and the next sibling is tried. If none is accepted, the bonus token is drawn
from what is left of p. For a chain this is Leviathan et al. / Chen et al.; over i.i.d. sampled siblings it
is SpecInfer's multi-round rejection; for deterministic drafts q is a point mass on the node's token. In
greedy decoding p is a point mass on the target's argmax, so the rule reduces to "accept while the draft
equals the argmax" and the bonus is the argmax; ``accept_greedy`` computes exactly that without a loop or
a read back to the host, which a decoding loop on a GPU pays for at every tree level otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import Sampling
from .tree import Tree


@dataclass
class Acceptance:
    path: torch.Tensor  # (B, D+1) node indices from the root, padded with 0
    length: torch.Tensor  # (B,) nodes on the path, >= 1: accepted drafts + the root
    tokens: torch.Tensor  # (B, D+1) new tokens: the path's drafted tokens, then the bonus token


def verify(tree: Tree, logits: torch.Tensor, sampling: Sampling, new_tokens: torch.Tensor,
           length: torch.Tensor) -> Acceptance:
    """The accepted path given the target's ``logits`` (B, N, V) after every node, processed as ``generate``
    would (``new_tokens`` and ``length`` as for ``Sampling.probs``): ``accept_greedy`` when decoding greedily,
    ``accept`` on the warped distributions when sampling."""
    if sampling.do_sample:
        return accept(tree, sampling.probs(logits, new_tokens, length))
    return accept_greedy(tree, sampling.greedy_tokens(logits, new_tokens, length))


def accept(tree: Tree, target_probs: torch.Tensor) -> Acceptance:
    """``target_probs`` (B, N, V): the target's processed next-token distribution after every node.

    Loops over the tree's depth and each node's children a fixed number of times (the tree's static bounds
    where the drafter gives them), masking rows that are done instead of asking the device whether any
    are: no host read, so a CUDA graph can hold it. ``path`` is ``max_depth + 1`` wide.
    """
    batch, n, vocab = target_probs.shape
    dev = target_probs.device
    rows = torch.arange(batch, device=dev)
    children = tree.children
    max_depth = tree.max_depth if tree.max_depth is not None else int(tree.depth.max())

    node = torch.zeros(batch, dtype=torch.long, device=dev)
    p = target_probs[:, 0]
    path = torch.zeros(batch, max_depth + 1, dtype=torch.long, device=dev)
    length = torch.ones(batch, dtype=torch.long, device=dev)
    bonus_p = p
    done = torch.zeros(batch, dtype=torch.bool, device=dev)

    for _ in range(max_depth + 1):  # a leaf at max_depth has no children: every row is done after this
        chosen = torch.full_like(node, -1)
        for kid in children[rows, node].unbind(-1):
            trying = (kid >= 0) & (chosen < 0) & ~done
            kid = kid.clamp(min=0)
            x = tree.tokens[rows, kid]
            if tree.draft_probs is None:
                q = torch.zeros_like(p).scatter_(1, x[:, None], 1.0)
            else:
                q = tree.draft_probs[rows, kid].to(p.dtype)
            p_x, q_x = p[rows, x], q[rows, x]
            ok = trying & (torch.rand(batch, device=dev) * q_x < p_x)
            chosen = torch.where(ok, kid, chosen)
            residual = (p - q).clamp(min=0)
            mass = residual.sum(-1, keepdim=True)
            # mass == 0 only when p == q, where a rejection has probability 0; keep p then.
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
            p = torch.where((trying & ~ok)[:, None], residual, p)
        advance = chosen >= 0
        stop = ~advance & ~done
        bonus_p = torch.where(stop[:, None], p, bonus_p)
        done |= stop
        node = torch.where(advance, chosen, node)
        slot = length.clamp(max=max_depth)[:, None]
        path.scatter_(1, slot, torch.where(advance[:, None], chosen[:, None], path.gather(1, slot)))
        length = length + advance.long()
        p = torch.where(advance[:, None], target_probs[rows, node], p)

    bonus = Sampling.draw(bonus_p)
    drafted = tree.tokens.gather(1, path[:, 1:])
    tokens = torch.cat([drafted, bonus[:, None]], dim=1)
    tokens[rows, length - 1] = bonus
    return Acceptance(path=path, length=length, tokens=tokens)


def accept_greedy(tree: Tree, target_tokens: torch.Tensor) -> Acceptance:
    """``accept`` for greedy decoding, given ``target_tokens`` (B, N): the target's choice after every node.

    A node is kept when its token is its parent's choice, no earlier sibling's token was, and the same holds
    for each of its ancestors; those nodes form one chain from the root, and its deepest node's choice is the
    bonus token. Fixed shapes: ``path`` and ``tokens`` are N wide whatever the tree's depth.
    """
    batch, n = tree.tokens.shape
    dev = tree.tokens.device
    rows = torch.arange(batch, device=dev)
    match = (tree.tokens == target_tokens.gather(1, tree.parents.clamp(min=0))) & tree.valid
    earlier_sibling = (tree.parents[:, :, None] == tree.parents[:, None, :]) & torch.ones(
        n, n, dtype=torch.bool, device=dev).tril(-1)
    first = match & ~(earlier_sibling & match[:, None, :]).any(-1)
    first[:, 0] = True
    kept = ~(tree.ancestors & ~first[:, None, :]).any(-1)
    depth = tree.depth
    leaf = torch.where(kept, depth, -1).argmax(-1)
    length = depth[rows, leaf] + 1
    on_path = tree.ancestors[rows, leaf]
    # Path nodes go to their depth's column; every other node to a spare column n, dropped after.
    path = torch.zeros(batch, n + 1, dtype=torch.long, device=dev).scatter_(
        1, torch.where(on_path, depth, n), torch.arange(n, device=dev).expand(batch, -1))[:, :n]
    tokens = tree.tokens.gather(1, path).roll(-1, 1)
    tokens[rows, length - 1] = target_tokens[rows, leaf]
    return Acceptance(path=path, length=length, tokens=tokens)
