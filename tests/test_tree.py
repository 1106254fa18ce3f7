"""The tree, cache and verifier pieces on hand-made inputs."""

import pytest
import torch

from specdec.cache import TreeCache
from specdec.tree import Tree
from specdec.verify import accept, accept_greedy


def test_from_paths_merges_shared_prefixes():
    tree = Tree.from_paths(torch.tensor([9, 8]), [[[1, 2, 3], [1, 4]], [[5]]])
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
    tree = Tree.from_paths(torch.tensor([0]), [[[1, 2], [3, 4, 5]]])
    target = point_mass([3, 0, 0, 4, 5, 7])  # argmax after nodes 0..5
    acc = accept(tree, target)
    assert acc.length.tolist() == [4]
    assert acc.path[0].tolist() == [0, 3, 4, 5]
    assert acc.tokens[0].tolist() == [3, 4, 5, 7]


def test_first_mismatch_gives_target_token_as_bonus():
    tree = Tree.from_paths(torch.tensor([0]), [[[1, 2]]])
    acc = accept(tree, point_mass([1, 6, 0]))
    assert acc.length.tolist() == [2] and acc.tokens[0, :2].tolist() == [1, 6]


def test_invalid_nodes_never_accepted():
    tree = Tree.from_paths(torch.tensor([0, 0]), [[[1, 2]], [[1]]])
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


def test_prompt_lookup_prefers_a_full_continuation_over_the_latest_short_one():
    """In a loop of period 3, the latest match of the tail leaves 3 tokens after it; earlier ones leave the
    full draft length, which is what the drafter must propose first."""
    from specdec.drafters.prompt_lookup import PromptLookup

    row = torch.tensor([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2])
    assert PromptLookup(num_draft_tokens=5, max_ngram=2)._continuations(row) == [[3, 1, 2, 3, 1]]
    both = PromptLookup(num_draft_tokens=5, max_ngram=2, tree_width=2)._continuations(row)
    assert both == [[3, 1, 2, 3, 1], [3, 1, 2]]


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
