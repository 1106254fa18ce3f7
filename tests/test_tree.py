"""The tree, cache and verifier pieces on hand-made inputs."""

import pytest
import torch

from specdec.cache import TreeCache
from specdec.drafters.prompt_lookup import PromptLookup
from specdec.sequences import Sequences
from specdec.tree import Tree
from specdec.verify import accept, accept_greedy


def from_paths(roots: torch.Tensor, paths: list[list[list[int]]]) -> Tree:
    """Trees by hand: each row's paths merged into a trie (node order: first seen first)."""
    rows = []
    for root, row_paths in zip(roots.tolist(), paths):
        tokens, parents, index = [root], [-1], {}
        for path in row_paths:
            node = 0
            for token in path:
                key = (node, token)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = index[key]
        rows.append((tokens, parents))
    n = max(len(t) for t, _ in rows)
    pad = lambda xs, v: xs + [v] * (n - len(xs))  # noqa: E731
    dev = roots.device
    return Tree(
        tokens=torch.tensor([pad(t, 0) for t, _ in rows], device=dev),
        parents=torch.tensor([pad(p, 0) for _, p in rows], device=dev),
        valid=torch.tensor([pad([True] * len(t), False) for t, _ in rows], device=dev),
    )


def test_depth_ancestors_and_children_of_a_trie():
    tree = from_paths(torch.tensor([9, 8]), [[[1, 2, 3], [1, 4]], [[5]]])
    assert tree.tokens[0].tolist() == [9, 1, 2, 3, 4]
    assert tree.parents[0].tolist() == [-1, 0, 1, 2, 1]
    assert tree.valid.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert tree.depth[0].tolist() == [0, 1, 2, 3, 2]
    assert tree.ancestors[0, 3].tolist() == [True, True, True, True, False]
    assert tree.children[0, 1].tolist() == [2, 4]
    assert tree.children[1, 0].tolist() == [1, -1]


def point_mass(tokens, vocab=10):
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()[None]


def test_greedy_accepts_longest_matching_branch():
    # root -> 1 -> 2, root -> 3 -> 4 -> 5; the target wants 3, 4, 5, then 7.
    tree = from_paths(torch.tensor([0]), [[[1, 2], [3, 4, 5]]])
    target = point_mass([3, 0, 0, 4, 5, 7])  # argmax after nodes 0..5
    acc = accept(tree, target)
    assert acc.length.tolist() == [4]
    assert acc.path[0].tolist() == [0, 3, 4, 5]
    assert acc.tokens[0].tolist() == [3, 4, 5, 7]


def test_first_mismatch_gives_target_token_as_bonus():
    tree = from_paths(torch.tensor([0]), [[[1, 2]]])
    acc = accept(tree, point_mass([1, 6, 0]))
    assert acc.length.tolist() == [2] and acc.tokens[0, :2].tolist() == [1, 6]


def test_invalid_nodes_never_accepted():
    tree = from_paths(torch.tensor([0, 0]), [[[1, 2]], [[1]]])
    target = point_mass([1, 2, 9]).expand(2, -1, -1).clone()
    acc = accept(tree, target)
    assert acc.length.tolist() == [3, 2]  # row 1's padding node carries token 0, never 2


def test_cache_compaction_keeps_each_rows_path_at_its_end():
    cache = TreeCache(capacity=4)
    keys = torch.arange(2 * 8, dtype=torch.float).reshape(2, 1, 8, 1)
    cache.update(keys, keys.clone(), 0)  # grows past its capacity
    # Row 0 ends at column 3 and keeps columns 5, 7; row 1 ends at 4 and keeps column 6.
    cache.compact(torch.tensor([[5, 7], [6, 0]]), torch.tensor([3, 4]), torch.tensor([2, 1]))
    layer = cache.layers[0]
    assert cache.get_seq_length() == 5
    assert layer.keys[0, 0, :5, 0].tolist() == [0, 1, 2, 5, 7]
    assert layer.keys[1, 0, :5, 0].tolist() == [8, 9, 10, 11, 14]


def lookup(rows, mask=None, ends=None, finished=None, **config):
    """Propose on a hand-built batch; columns past ``ends`` keep their tokens as garbage to be ignored. The
    buffer is cut to the prompt, so continuations run into its edge and it may hold fewer columns than
    the drafter ranks."""
    ids = torch.tensor(rows)
    seqs = Sequences.from_prompt(ids, torch.ones_like(ids) if mask is None else torch.tensor(mask), 0)
    seqs.tokens = seqs.tokens[:, : ids.shape[1]]
    if ends is not None:
        seqs.end = torch.tensor(ends)
    if finished is not None:
        seqs.finished = torch.tensor(finished)
    return PromptLookup(**config).propose(seqs)


def node_paths(tree, b):
    """Each valid node's tokens from below the root down to it, in index order."""
    tokens, parents, valid = tree.tokens[b].tolist(), tree.parents[b].tolist(), tree.valid[b].tolist()
    found = []
    for i in range(1, len(tokens)):
        if valid[i]:
            path, node = [], i
            while node > 0:
                assert valid[node] and parents[node] < node
                path, node = [tokens[node]] + path, parents[node]
            found.append(tuple(path))
    return found


def test_prompt_lookup_prefers_a_full_continuation_over_the_latest_short_one():
    """In a loop of period 3, the latest match of the tail leaves 3 tokens after it; earlier ones leave the
    full draft length, which is what the drafter must propose first."""
    row = [[7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]]
    tree = lookup(row, num_draft_tokens=5, max_ngram=2)
    assert tree.tokens.tolist() == [[2, 3, 1, 2, 3, 1]] and tree.valid.all()
    assert (tree.max_depth, tree.max_children) == (5, 1)
    both = lookup(row, num_draft_tokens=5, max_ngram=2, tree_width=2)
    assert both.tokens.shape == (1, 11)
    assert {(3, 1, 2, 3, 1), (3, 1, 2)} <= set(node_paths(both, 0))


def test_prompt_lookup_merges_shared_prefixes():
    """Two continuations of the tail 5, [1, 3] (latest first) and [1, 4], share their first token."""
    tree = lookup([[5, 1, 4, 5, 1, 3, 5]], num_draft_tokens=2, max_ngram=1, tree_width=2)
    assert tree.tokens.tolist() == [[5, 1, 3, 0, 4]]
    assert tree.parents.tolist() == [[-1, 0, 1, 0, 1]]
    assert tree.valid.tolist() == [[True, True, True, False, True]]
    assert tree.children[0, 1].tolist() == [2, 4]


def test_prompt_lookup_drops_repeated_continuations():
    """[1, 2] follows the tail 5 twice; the repeat gives its place to the next distinct one, [7, 7]."""
    tree = lookup([[5, 7, 7, 5, 1, 2, 5, 1, 2, 9, 5]], num_draft_tokens=2, max_ngram=1, tree_width=2)
    assert node_paths(tree, 0) == [(1,), (1, 2), (7,), (7, 7)]
    assert tree.parents.tolist() == [[-1, 0, 1, 0, 3]]


def test_prompt_lookup_rows_with_left_padding_and_different_ends():
    """Row 0 is [3, 4, 3] after padding that equals its tail, with a garbage 3 past its end: neither the
    padding nor the garbage may match or extend a continuation."""
    tree = lookup([[3, 3, 3, 4, 3, 3], [5, 6, 5, 7, 5, 6]], mask=[[0, 0, 1, 1, 1, 1], [1] * 6], ends=[5, 6],
                  num_draft_tokens=3, max_ngram=2, tree_width=2)
    assert tree.tokens[:, 0].tolist() == [3, 6]
    assert node_paths(tree, 0) == [(4,), (4, 3)]
    assert node_paths(tree, 1) == [(5,), (5, 7), (5, 7, 5)]


def test_prompt_lookup_finished_rows_and_rows_without_a_match_keep_only_their_root():
    tree = lookup([[1, 2, 1, 2], [1, 2, 1, 2], [1, 2, 3, 4]], finished=[True, False, False], num_draft_tokens=2)
    assert tree.valid[:, 1:].sum(1).tolist() == [0, 2, 0]
    assert tree.tokens[:, 0].tolist() == [2, 2, 4]


def reference_continuations(row, length, min_ngram, max_ngram, width):
    """The former per-row lookup, limited as the drafter is to the ``4 * width`` best-ranked columns."""
    columns = []
    for n in range(min(max_ngram, len(row) - 1), min_ngram - 1, -1):
        starts = [s for s in range(n, len(row)) if row[s - n : s] == row[-n:]]
        full = [s for s in starts if s <= len(row) - length]
        columns += [s for s in full[::-1] + [s for s in starts if s not in full] if s not in columns]
    found = []
    for s in columns[: 4 * width]:
        if row[s : s + length] not in found:
            found.append(row[s : s + length])
    return found[:width]


@pytest.mark.parametrize("seed", range(10))
def test_prompt_lookup_tree_is_the_trie_of_the_first_distinct_continuations(seed):
    """Random rows over a small vocabulary (so matches abound), left-padded and of different ends: every
    valid node is one prefix of the reference continuations, each prefix exactly once."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda high, low=1: int(torch.randint(low, high + 1, (1,), generator=gen))  # noqa: E731
    length, width, max_ngram = rand(5), rand(3), rand(3)
    min_ngram = rand(max_ngram)
    lengths = [rand(30, low=1) for _ in range(3)]
    garbage = [rand(4, low=0) for _ in range(3)]
    cols = max(a + g for a, g in zip(lengths, garbage))
    ids = torch.randint(0, 3, (3, cols), generator=gen)
    mask = [[int(c >= cols - a - g) for c in range(cols)] for a, g in zip(lengths, garbage)]
    ends = [cols - g for g in garbage]
    tree = lookup(ids.tolist(), mask=mask, ends=ends, num_draft_tokens=length, max_ngram=max_ngram,
                  min_ngram=min_ngram, tree_width=width)
    assert tree.tokens.shape == (3, 1 + width * length)
    assert (tree.parents[:, 1:] < torch.arange(1, 1 + width * length)).all()
    assert (tree.children >= 0).sum(-1).max() <= width  # max_children really bounds
    assert (tree.tokens[:, 1:][~tree.valid[:, 1:]] == 0).all() and (tree.parents[~tree.valid] == 0).all()
    for b, (a, end) in enumerate(zip(lengths, ends)):
        row = ids[b, end - a : end].tolist()
        conts = reference_continuations(row, length, min_ngram, max_ngram, width)
        prefixes = {tuple(c[:d]) for c in conts for d in range(1, len(c) + 1)}
        got = node_paths(tree, b)
        assert tree.tokens[b, 0] == row[-1]
        assert len(got) == len(prefixes) and set(got) == prefixes, (row, conts)


@pytest.mark.parametrize("seed", range(50))
def test_greedy_acceptance_equals_the_general_rule_on_point_masses(seed):
    """Random trees with repeated sibling tokens (the first matching sibling wins), invalid nodes and rows of
    different shapes: the loop-free greedy rule keeps the same path, tokens and bonus as the general one."""
    gen = torch.Generator().manual_seed(seed)
    batch, n, vocab = 4, 12, 3  # a small vocabulary makes matches and repeats common
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])
                           for _ in range(batch)])
    tokens = torch.randint(0, vocab, (batch, n), generator=gen)
    valid = torch.rand(batch, n, generator=gen) < 0.8
    valid[:, 0] = True
    for i in range(1, n):  # a node is valid only under a valid parent, as drafters build trees
        valid[:, i] &= valid.gather(1, parents[:, i:i + 1].clamp(min=0)).squeeze(1)
    tree = Tree(tokens=tokens, parents=parents, valid=valid)
    choice = torch.randint(0, vocab, (batch, n), generator=gen)
    expected = accept(tree, torch.nn.functional.one_hot(choice, vocab).float())
    got = accept_greedy(tree, choice)
    assert torch.equal(got.length, expected.length)
    for b, length in enumerate(expected.length.tolist()):
        assert got.path[b, :length].tolist() == expected.path[b, :length].tolist()
        assert got.tokens[b, :length].tolist() == expected.tokens[b, :length].tolist()
    assert got.path.shape == got.tokens.shape == (batch, n)
