"""Medusa and EAGLE heads as drafters: feature plumbing, tree construction, storage, target checks.

Greedy equality and sampling losslessness for both drafters run with the others in test_greedy.py and
test_sampling.py; training is tested in test_train_heads.py.
"""

from unittest import mock

import pytest
import torch
from transformers import DynamicCache

import specdec
from models import perturbed, prompts, tiny
from specdec import features, heads
from specdec.drafters.base import Drafter
from specdec.forward import cache_keyword
from specdec.sampling import Sampling
from specdec.sequences import Sequences


class Spy(Drafter):
    """Wraps a drafter and keeps the batch's sequences, to look at the features the engine stored (in a dict
the call's copy of the spy shares)."""

    wants_features = True

    def __init__(self, inner):
        self.inner = inner
        self.seen = {}

    def begin(self, target, seqs, sampling):
        self.seen["seqs"] = seqs
        self.inner.begin(target, seqs, sampling)

    def propose(self, seqs):
        return self.inner.propose(seqs)

    def end(self):
        self.inner.end()


def target_features(model, row: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), features.capture(model) as got:
        model(row[None])
    return got[0][0]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_engine_stores_the_target_features_of_every_accepted_token(arch):
    model = tiny(arch, attn="eager")
    ids, mask = prompts(4, 9, seed=2)
    spy = Spy(heads.Eagle(heads.EagleHead(model), top_k=3, depth=3, total_tokens=8))
    out = specdec.generate(model, ids, attention_mask=mask, drafter=spy, max_new_tokens=20, eos_token_id=None)
    seqs = spy.seen["seqs"]
    for b in range(4):
        start, end = int(seqs.start[b]), int(seqs.end[b])
        assert torch.equal(seqs.tokens[b, start:end], out[b, start:end])
        want = target_features(model, out[b, start:end])[:-1]  # the last token's feature is not known yet
        torch.testing.assert_close(seqs.features[b, start : end - 1], want, atol=1e-5, rtol=1e-4)


def first_proposal(drafter, model, ids):
    """Prefill the target as generate does, then one proposal for the prompt ``ids`` (1, W)."""
    seqs = Sequences.from_prompt(ids, torch.ones_like(ids), 64)
    seqs.write_prompt_features(target_features(model, ids[0])[None, :-1])
    drafter.begin(model, seqs, Sampling.from_config(model.generation_config))
    return drafter.propose(seqs), seqs


def test_eagle_drafts_what_the_teacher_forced_head_predicts():
    """The cached, level-by-level drafting path must compute what training computes in one pass."""
    model = tiny("llama")
    head = heads.EagleHead(model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids, _ = prompts(1, 10, seed=4)
    tree, seqs = first_proposal(heads.Eagle(head, top_k=3, depth=2, total_tokens=12), model, ids)
    feats = target_features(model, ids[0])[None]
    with torch.no_grad():
        predicted, logits = head(feats[:, :-1], ids[:, 1:])
    level1 = logits[0, -1].topk(3).indices
    assert tree.tokens[0, 1:4].tolist() == level1.tolist()
    # The best first-level node's children come from feeding it with the feature predicted at the root.
    best = int(level1[0])
    with torch.no_grad():
        _, logits2 = head(torch.cat([feats[:, :-1], predicted[:, -1:]], 1), torch.cat([ids[:, 1:], torch.tensor([[best]])], 1))
    children = tree.tokens[0][tree.parents[0] == 1].tolist()
    assert children == logits2[0, -1].topk(3).indices.tolist()


def test_eagle_keeps_the_best_nodes_as_a_tree():
    model = tiny("llama")
    tree, _ = first_proposal(heads.Eagle(heads.EagleHead(model), top_k=4, depth=4, total_tokens=10), model,
                             prompts(1, 8, seed=1)[0])
    assert tree.tokens.shape == (1, 11)
    parents = tree.parents[0].tolist()
    assert parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)
    assert int(tree.depth.max()) >= 2


def test_medusa_tree_shapes_and_drafts():
    model = tiny("llama")
    medusa = heads.MedusaHeads(model, num_heads=3)
    assert heads.Medusa(medusa, top_k=(3, 2, 2)).parents.shape[0] == 1 + 3 + 6 + 12
    sparse = heads.Medusa(medusa, tree=[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
    assert sparse.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    ids, _ = prompts(1, 8, seed=3)
    tree, seqs = first_proposal(sparse, model, ids)
    with torch.no_grad():
        top = medusa(seqs.features[0, 6]).topk(2, dim=-1).indices  # the feature that predicted the root
    assert tree.tokens[0].tolist() == [int(ids[0, -1]), top[0, 0], top[0, 1], top[1, 0], top[1, 1], top[2, 0]]


@pytest.mark.parametrize("options,match", [
    (dict(top_k=(2, 2), tree=[(0,)]), "not both"),
    (dict(tree=[(0, 1)]), "prefix"),
    (dict(tree=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]), "at most 3"),
    (dict(top_k=(2, 0)), "top_k\\[1\\]"),
])
def test_medusa_refuses_bad_trees(options, match):
    with pytest.raises(ValueError, match=match):
        heads.Medusa(heads.MedusaHeads(tiny("llama"), num_heads=3), **options)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_save_load_round_trip(tmp_path, kind):
    model = tiny("llama")
    head = heads.build(kind, model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    heads.save(head, tmp_path, training={"steps": 3})
    assert (tmp_path / "heads.safetensors").stat().st_mode == (tmp_path / "config.json").stat().st_mode
    loaded = heads.load_head(tmp_path, model)
    assert head.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, loaded.state_dict()[k]) for k, a in head.state_dict().items())
    assert not any("embed" in k or "lm_head" in k for k in head.state_dict()), "the target's weights were saved"
    ids, mask = prompts(2, 7, seed=0)
    outs = [specdec.generate(model, ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True,
                             drafter=d).stats.accepted_tokens
            for d in (heads.drafter(head), heads.load(tmp_path, model))]
    assert outs[0] == outs[1]


def test_loading_for_another_target_is_refused(tmp_path):
    model = tiny("llama")
    heads.save(heads.build("medusa", model), tmp_path)
    with pytest.raises(ValueError, match="LM head weights differ"):
        heads.load(tmp_path, tiny("llama", seed=5))
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=64"):
        heads.load(tmp_path, tiny("llama", hidden_size=64))
    with pytest.raises(ValueError, match="architecture"):
        heads.load(tmp_path, tiny("qwen3"))
    with pytest.raises(FileNotFoundError, match="No saved heads"):
        heads.load(tmp_path / "missing", model)
    # A model loaded in another precision is still the same target.
    heads.load(tmp_path, perturbed(model, scale=0.0).to(torch.bfloat16))


def test_heads_build_for_a_target_with_more_than_2_to_24_lm_head_weights():
    """An 8B-shaped target's LM head has 16384 x 4096 weights: the fingerprint's last float32 place rounded
    past the end and the GPU asserted. 16384 x 2048 rounds over the same way."""
    model = tiny("llama", vocab_size=16384, hidden_size=2048, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True).to(torch.bfloat16)
    sample = heads.build("medusa", model).target_fingerprint["lm_head_sample"]
    assert sample[-1] == model.get_output_embeddings().weight[-1, -1].item()


def test_drafting_for_another_target_is_refused_before_anything_runs():
    model, other = tiny("llama"), tiny("llama", seed=7)
    drafter = heads.Medusa(heads.MedusaHeads(model))
    ids, _ = prompts(1, 5, seed=0)
    with pytest.raises(ValueError, match="Medusa heads were trained for another"):
        specdec.generate(other, ids, drafter=drafter, max_new_tokens=4)


def test_feature_drafters_refuse_a_prefilled_cache():
    model = tiny("llama")
    ids, _ = prompts(1, 6, seed=0)
    cache = DynamicCache()
    model(ids[:, :3], **{cache_keyword(model): cache})
    with pytest.raises(ValueError, match="past_key_values"):
        specdec.generate(model, ids, drafter=heads.Eagle(heads.EagleHead(model)), past_key_values=cache)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_one_token_prompts(kind):
    """No feature exists before the first verification: the first step drafts nothing, later ones do."""
    model = tiny("llama")
    drafter = heads.drafter(heads.build(kind, model))
    ids = torch.tensor([[7], [9]])
    expected = model.generate(ids, do_sample=False, max_new_tokens=10)
    out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert out.stats.drafted_tokens > 0


def test_head_on_another_device_is_refused():
    model = tiny("llama")
    head = heads.MedusaHeads(model).to("meta")
    with pytest.raises(ValueError, match="move the head"):
        heads.Medusa(head).check(model)


def sampled_trees(target, drafter) -> list:
    """The trees with drafted nodes that ``drafter`` proposes while the target samples (2 ragged rows)."""
    trees, propose = [], type(drafter).propose

    def record(self, seqs):  # on the call's copy of the drafter
        trees.append(propose(self, seqs))
        return trees[-1]

    ids, mask = prompts(2, 9, seed=0)
    with mock.patch.object(type(drafter), "propose", record):
        specdec.generate(target, ids, attention_mask=mask, drafter=drafter, do_sample=True, max_new_tokens=6)
    drafted = [t for t in trees if t.tokens.shape[1] > 1]
    assert drafted
    return drafted


def test_sampled_eagle_drafts_whole_sibling_groups_with_their_distributions():
    """When sampling, every expanded node's children are i.i.d. draws that carry the distribution they came
    from, and the tree keeps whole sibling groups (a prefix of the last): cutting single samples by their
    own values would bias the verification (the chi-square test catches that cut)."""
    torch.manual_seed(0)
    target = tiny("llama")
    for tree in sampled_trees(target, heads.Eagle(heads.EagleHead(target), top_k=3, depth=3, total_tokens=7)):
        q = tree.draft_probs
        assert q is not None and tree.tokens.shape[1] == 8
        assert torch.allclose(q[:, 1:].sum(-1), torch.ones(1)) and (q[:, 0] == 0).all()
        assert (q[:, 1:].gather(-1, tree.tokens[:, 1:, None]) > 0).all()  # each token drawn from its q
        for row in tree.parents.tolist():
            sizes = sorted((row[1:].count(p) for p in set(row[1:])), reverse=True)
            assert sizes == [3, 3, 1]  # the root's group, one whole group, a prefix of one more


def test_sampled_medusa_draws_each_node_from_its_head():
    """When sampling, every node's token is drawn from its own head's distribution, which the tree carries
    (a depth-d node from head d-1), so the verifier can accept with min(1, p/q) instead of a point mass."""
    torch.manual_seed(0)
    target = tiny("llama")
    medusa = heads.MedusaHeads(target, num_heads=2)
    with torch.no_grad():
        for p in medusa.parameters():  # untrained heads all repeat the LM head
            p.normal_(0, 0.3)
    for tree in sampled_trees(target, heads.Medusa(medusa, top_k=(2, 2))):
        q = tree.draft_probs
        assert q is not None and (q[:, 0] == 0).all() and torch.allclose(q[:, 1:].sum(-1), torch.ones(1))
        assert torch.equal(q[:, 1], q[:, 2]) and torch.equal(q[:, 3], q[:, 6])  # siblings and cousins share a head
        assert not torch.equal(q[:, 1], q[:, 3])
        assert (q[:, 1:].gather(-1, tree.tokens[:, 1:, None]) > 0).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_eagle_head_builds_no_vocabulary_sized_module(arch, monkeypatch):
    """The head borrows the target's embedding and LM head; building its own first would cost gigabytes for a
    large vocabulary, thrown away at once."""
    target = tiny(arch, vocab_size=4096)
    built = []
    for cls in (torch.nn.Embedding, torch.nn.Linear):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _init=init, **k: (built.append(a[:2]), _init(self, *a, **k))[1])
    head = heads.EagleHead(target)
    assert built and all(4096 not in sizes for sizes in built)
    assert head.decoder.get_output_embeddings().module is target.get_output_embeddings()
