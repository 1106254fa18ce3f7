"""The Triton tree-attention and cache-compaction kernels against float64 references.

On a CPU they run under TRITON_INTERPRET=1 (conftest sets it); on a GPU the same tests run the compiled
kernels. The interpreter's bf16 ``tl.dot`` is wrong, so there bf16 inputs are upcast to fp32 (the values
stay bf16-representable); on a GPU bf16 runs natively. Every allocation the kernels make is poisoned
with NaN, so an element the kernel fails to write fails the comparison.
"""

import pytest
import torch

import specdec
from models import perturbed, prompts, tiny
from specdec import attention
from specdec.kernels import compact as compact_module
from specdec.kernels import tree_attention as kernel
from specdec.tree import Tree

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def poisoned(monkeypatch):
    real_empty = torch.empty

    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -(2**30))

    monkeypatch.setattr(torch, "empty", empty)


def random_parents(kind: str, n: int, gen: torch.Generator) -> list[int]:
    parents = [-1]
    for i in range(1, n):
        if kind == "chain":
            parents.append(i - 1)
        elif kind == "star":
            parents.append(0)
        elif kind == "deep":
            parents.append(int(torch.randint(max(0, i - 2), i, (1,), generator=gen)))
        else:  # bushy
            parents.append(int(torch.randint(0, max(1, i // 2), (1,), generator=gen)))
    return parents


def make_case(batch, hq, hkv, t, head_dim, prefix, dtype, kind="bushy", old=0, seed=0):
    """A cache of ``prefix`` columns (rows ragged: different starts and ends) followed by a region of
    ``old`` earlier nodes and ``t`` new tree nodes; returns kernel arguments and the region visibility."""
    gen = torch.Generator().manual_seed(seed)
    trees = [random_parents(kind, t, gen) for _ in range(batch)]
    parents = torch.tensor(trees)
    anc = Tree(torch.zeros_like(parents), parents, torch.ones_like(parents, dtype=torch.bool)).ancestors
    visible = torch.cat([torch.rand(batch, t, old, generator=gen) < 0.5, anc], -1)
    start = torch.randint(0, max(1, prefix // 3), (batch,), generator=gen)
    end = prefix - torch.randint(0, max(1, prefix // 4), (batch,), generator=gen)
    start[0], end[0] = 0, prefix
    end = torch.maximum(end, start)
    depth = anc.sum(-1) - 1
    q_pos = (end - start)[:, None] + depth
    region_pos = torch.cat([q_pos[:, :1].expand(-1, old) - 1, q_pos], -1) if old else q_pos
    length = prefix + old + t

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = rand(batch, hq, t, head_dim), rand(batch, hkv, length, head_dim), rand(batch, hkv, length, head_dim)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        q, k, v = q.float(), k.float(), v.float()
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), start=to(start), end=to(end), region_start=prefix,
                q_pos=to(q_pos), region_pos=to(region_pos)), to(visible)


def check(args, visible, dtype, **options):
    got = kernel.tree_attention(**args, bits=kernel.pack_visibility(visible), **options)
    options.pop("num_splits", None)
    want = kernel.reference(**args, visible=visible, **options)
    assert got.shape == want.shape and got.dtype == args["q"].dtype
    assert not got.isnan().any(), "unwritten or NaN output"
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("kind", ["chain", "star", "deep", "bushy"])
@pytest.mark.parametrize("batch,hq,hkv,t,head_dim,prefix", [
    (1, 4, 4, 8, 64, 100),      # MHA
    (3, 8, 2, 5, 16, 37),       # GQA 4, odd T and prefix, ragged rows
    (2, 8, 1, 17, 128, 300),    # MQA, several prefix splits
    (2, 2, 2, 1, 32, 1),        # a single node over a one-token prefix
])
def test_matches_reference(poisoned, kind, batch, hq, hkv, t, head_dim, prefix):
    args, visible = make_case(batch, hq, hkv, t, head_dim, prefix, torch.float32, kind)
    check(args, visible, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
def test_splits_and_dtypes(poisoned, dtype, num_splits):
    args, visible = make_case(2, 8, 2, 12, 128, 500, dtype, "bushy", seed=1)
    check(args, visible, dtype, num_splits=num_splits)


@pytest.mark.parametrize("heads,region_start,splits", [
    (8, 4096, 13),   # an 8B step at P=4k: 14 programs per KV head, 112 of 132 multiprocessors
    (16, 4096, 7),   # two row blocks per KV head
    (8, 100, 2),     # a short prefix: chunks of whole blocks
    (264, 4096, 1),  # more KV heads than a wave holds: one chunk each
])
def test_default_split_fills_one_wave(monkeypatch, heads, region_start, splits):
    """The prefix programs of every (row, KV head, row block), plus its region program, fit one wave of
    an H100's 132 multiprocessors; a program more would cost a second wave."""
    monkeypatch.setattr(kernel, "_multiprocessors", lambda device: 132)
    chunk, n_prefix = kernel.prefix_split(region_start, heads, 64, torch.device("cpu"))
    assert n_prefix == splits and chunk % 64 == 0 and (n_prefix - 1) * chunk < region_start <= n_prefix * chunk
    assert heads * (n_prefix + 1) <= 132 or n_prefix == 1


@pytest.mark.parametrize("head_dim", [8, 96, 256])
def test_head_dims(poisoned, head_dim):
    args, visible = make_case(2, 4, 2, 6, head_dim, 70, torch.float32, "deep", seed=2)
    check(args, visible, torch.float32)


def test_many_nodes_and_earlier_region_nodes(poisoned):
    """Drafting levels see nodes cached by earlier passes (region wider than T); prefill-sized T."""
    args, visible = make_case(2, 4, 2, 70, 32, 90, torch.float32, "bushy", old=45, seed=3)
    check(args, visible, torch.float32, num_splits=2)


@pytest.mark.parametrize("window", [1, 4, 50])
def test_sliding_window(poisoned, window):
    args, visible = make_case(2, 4, 2, 9, 32, 120, torch.float32, "deep", seed=4)
    check(args, visible, torch.float32, window=window, num_splits=4)


def test_softcap_and_scale(poisoned):
    args, visible = make_case(2, 4, 2, 9, 32, 60, torch.float32, "bushy", seed=5)
    check(args, visible, torch.float32, softcap=3.0, scale=0.7)


def test_reference_is_checked_against_a_wrong_tree():
    """Guards the comparison itself: a kernel given another tree's mask must disagree."""
    args, visible = make_case(1, 4, 2, 8, 32, 20, torch.float32, "chain", seed=6)
    got = kernel.tree_attention(**args, bits=kernel.pack_visibility(visible.transpose(1, 2)))
    want = kernel.reference(**args, visible=visible)
    assert (got.double() - want).abs().max() > 1e-2


def test_pack_visibility_round_trip():
    visible = torch.rand(2, 3, 70) < 0.5
    visible[..., 31] = True  # the sign bit of the first word
    bits = kernel.pack_visibility(visible)
    assert bits.shape == (2, 3, 3) and bits.dtype == torch.int32
    unpacked = (bits[..., None] >> torch.arange(32)) & 1
    assert torch.equal(unpacked.flatten(-2)[..., :70].bool(), visible)


def reference_compact(k, src, dest, keep):
    out = k.clone()
    for b in range(k.shape[0]):
        out[b, :, dest[b] : dest[b] + keep[b]] = k[b, :, src[b, : keep[b]]]
    return out


@pytest.mark.parametrize("head_dim,dtype", [(16, torch.float32), (128, torch.float32), (128, torch.bfloat16)])
def test_compact_moves_only_the_kept_path(head_dim, dtype):
    """Three layers in one launch; the kernel copies bytes, so bf16 moves as exactly as fp32."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, cache_len, nodes = 4, 2, 20, 9
    shape = (batch, heads, cache_len + nodes, head_dim)
    layers = [tuple(torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in "kv") for _ in range(3)]
    # Row 0 is already in place for its first entry; row 1 overlaps its own sources (dest + 3 == src[0]);
    # row 2 keeps nothing past the root; row 3 jumps over rejected branches.
    paths = torch.tensor([[0, 1, 2, 5], [0, 1, 2, 3], [0, 4, 6, 8], [0, 3, 7, 8]])
    src = (cache_len + paths).to(DEVICE)
    dest = torch.tensor([cache_len, cache_len - 3, cache_len - 1, cache_len - 6]).to(DEVICE)
    keep = torch.tensor([4, 4, 1, 3]).to(DEVICE)
    want = [tuple(reference_compact(x, src, dest, keep) for x in layer) for layer in layers]
    compact_module.compact(compact_module.address_table(layers), *layers[0], src, dest, keep)
    for (k, v), (want_k, want_v) in zip(layers, want):
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_cache_compacts_layers_of_two_geometries():
    """A model whose layers differ in KV heads or head size gets one launch per geometry; every layer
    ends as the reference path leaves it."""
    from specdec.cache import TreeCache

    gen = torch.Generator().manual_seed(1)
    shapes = [(2, 16), (1, 32), (2, 16)]  # (KV heads, head size) of each layer
    caches = {name: TreeCache(capacity=16) for name in ("kernel", "mask")}
    for i, (heads, dim) in enumerate(shapes):
        k, v = (torch.randn(3, heads, 12, dim, generator=gen).to(DEVICE) for _ in "kv")
        for cache in caches.values():
            cache.update(k.clone(), v.clone(), i)
    src = torch.tensor([[9, 10, 11], [8, 11, 0], [10, 0, 0]]).to(DEVICE)
    dest, keep = torch.tensor([5, 7, 2]).to(DEVICE), torch.tensor([3, 2, 1]).to(DEVICE)
    for name, cache in caches.items():
        with attention.backend(name):
            cache.compact(src, dest, keep)
    assert len(caches["kernel"]._address_tables(caches["kernel"].layers)) == 2
    for got, want in zip(caches["kernel"].layers, caches["mask"].layers):
        for b, n in enumerate((dest + keep).tolist()):  # columns past a row's new end are not specified
            assert torch.equal(got.keys[b, :, :n], want.keys[b, :, :n])
            assert torch.equal(got.values[b, :, :n], want.values[b, :, :n])


def test_kernel_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        with attention.backend("fast"):
            pass
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with attention.backend("kernel"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            attention.use_kernel(torch.device("cpu"), 64)
        with attention.backend("auto"):
            assert not attention.use_kernel(torch.device("cpu"), 64)
    with attention.backend("kernel"), pytest.raises(RuntimeError, match="head dim 512"):
        attention.use_kernel(torch.device(DEVICE), 512)


def test_kernel_implementation_outside_the_verifier_is_refused():
    model = tiny("llama")
    with attention.kernel_attention(model), pytest.raises(RuntimeError, match="only runs inside"):
        model(torch.tensor([[5, 6, 7]]))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch,make_drafter", [
    ("llama", lambda m: specdec.DraftModel(perturbed(m, scale=0.02).to(DEVICE), num_draft_tokens=3, tree_width=2)),
    ("gemma2", lambda m: specdec.PromptLookup(num_draft_tokens=4, tree_width=2)),  # window + softcap
])
@pytest.mark.parametrize("fast_path", [None, True], ids=["dynamic", "fixed-shapes"])
def test_greedy_through_kernel_equals_generate(monkeypatch, arch, make_drafter, fast_path):
    """Two ragged rows, and a draft close enough that its trees are partly accepted, so accepted paths move
    in the cache: small, as every interpreted launch costs up to a second on a CPU."""
    model = tiny(arch, attn="eager" if arch == "gemma2" else "sdpa")
    drafter = make_drafter(model)
    model.to(DEVICE)
    ids, mask = [x.to(DEVICE) for x in prompts(2, 8, seed=11)]
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    calls = []
    real = kernel.tree_attention
    monkeypatch.setattr(kernel, "tree_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with attention.backend("kernel"):
        out = specdec.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=12,
                               fast_path=fast_path, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert calls, "the kernel was not called"
    assert 0 < out.stats.accepted_tokens < out.stats.drafted_tokens, "drafts all rejected or all accepted"
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")
