"""Time the tree-attention kernel against the other ways to run the same verification attention.

One run, same inputs for every method: a KV cache of P prefix tokens plus a tree of T nodes (each node
with up to 4 children, breadth first), 32 query heads over 8 KV heads, head dim 128, bf16, batch 1.

- ``kernel``: specdec's Triton kernel (``kernels/tree_attention.py``);
- ``sdpa``: ``F.scaled_dot_product_attention`` with a dense bool mask and ``enable_gqa``;
- ``hf_sdpa``: what the reference path runs: transformers' SDPA function, which repeats K/V per query
  head and takes a dense float mask;
- ``flex``: compiled FlexAttention with a BlockMask (built outside the timing; ``flex_mask_ms`` is what
  rebuilding it costs, once per step, since the tree changes every step);
- ``eager``: transformers' eager attention as Llama defines it (matmul, mask, softmax, matmul);
- ``copy``: device-to-device copies of 128 MiB to 1 GiB, measured once per run; the fastest is the ceiling.

Times are device time per call, the median of CUDA-graph replays in which each call runs on its own
copy of the inputs (enough copies to overflow L2, so K/V always come from HBM), as a decoding loop under
CUDA graphs sees them. ``kernel launched ms`` is the same kernel called from Python
(``triton.testing.do_bench``, L2 flushed), host launch cost included. ``kernel GB/s`` counts the bytes
the kernel must move (K, V, Q and the output); ``of copy`` compares it with the copy's read+write
bandwidth. Rows go to stdout as a Markdown table and, with ``--out``, to a JSON file after every row.

    python benchmarks/tree_attention.py --out results.json [--P 512 2048] [--T 8 32] [--sweep [--graph] [--splits 8 16]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

from specdec.kernels import tree_attention as kernel  # noqa: E402
from specdec.tree import Tree  # noqa: E402

HQ, HKV, HEAD_DIM = 32, 8, 128
L2_FLUSH_BYTES = 512 * 2**20
METHODS = ("kernel", "sdpa", "hf_sdpa", "flex", "eager")


class _Module:
    """The attributes transformers' attention functions read from an attention layer."""

    num_key_value_groups = HQ // HKV
    is_causal = False
    training = False


def tree_parents(t: int) -> torch.Tensor:
    return torch.tensor([-1] + [(i - 1) // 4 for i in range(1, t)])


def make_inputs(p: int, t: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    parents = tree_parents(t)[None].to(device)
    anc = Tree(torch.zeros_like(parents), parents, torch.ones_like(parents, dtype=torch.bool)).ancestors  # (1, T, T)
    q_pos = p + anc.sum(-1) - 1
    k, v = (torch.randn(1, HKV, p + t, HEAD_DIM, device=device, generator=gen, dtype=dtype) for _ in range(2))
    q = torch.randn(1, HQ, t, HEAD_DIM, device=device, generator=gen, dtype=dtype)
    zero, end = torch.zeros(1, dtype=torch.long, device=device), torch.full((1,), p, device=device)
    return dict(q=q, k=k, v=v, start=zero, end=end, region_start=p, q_pos=q_pos, region_pos=q_pos), anc


def bench_launch(fn) -> float:
    """Median ms of one call as Python issues it (host launch cost included), L2 flushed between calls."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def bench_graph(fns) -> float:
    """Median device ms per call: one CUDA graph calls every function of ``fns``, each on its own buffers,
    so that together they overflow L2 and no call finds its K/V cached; no host cost is timed."""
    if not torch.cuda.is_available():
        return bench_launch(lambda: [f() for f in fns])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return sorted(times)[len(times) // 2]


def flex_block_mask(anc, p: int, t: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    tree = anc[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < p) | tree[q_idx, (kv_idx - p).clamp(min=0)]

    return lambda: create_block_mask(mask_mod, None, None, t, p + t, device=device)


def methods(args, anc, block_mask, flex) -> dict:
    """Each method as a zero-argument callable returning (B, T, Hq, D)."""
    q, k, v, p, t = args["q"], args["k"], args["v"], args["region_start"], args["q"].shape[2]
    bits = kernel.pack_visibility(anc)
    visible = torch.cat([torch.ones(1, t, p, dtype=torch.bool, device=q.device), anc], -1)[:, None]
    float_mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
    scale = HEAD_DIM**-0.5
    fns = {
        "kernel": lambda: kernel.tree_attention(**args, bits=bits),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, scale=scale, enable_gqa=True).transpose(1, 2),
        "hf_sdpa": lambda: sdpa_attention_forward(_Module, q, k, v, float_mask, scaling=scale)[0],
        "eager": lambda: eager_attention_forward(_Module, q, k, v, float_mask, scaling=scale)[0],
    }
    if flex is not None:
        fns["flex"] = lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)
    return fns


def run_row(p: int, t: int, device: str, flex, copy_gbps: float) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args, anc = make_inputs(p, t, device, dtype)
    kv_bytes = 2 * args["k"].numel() * args["k"].element_size()
    n_copies = -(-L2_FLUSH_BYTES // kv_bytes) if device == "cuda" else 1
    copies = [args] + [make_inputs(p, t, device, dtype, seed)[0] for seed in range(1, n_copies)]
    row = {"P": p, "T": t, "copies": len(copies)}
    block_mask = None
    if flex is not None:
        build = flex_block_mask(anc, p, t, args["q"].device)
        block_mask = build()
        row["flex_mask_ms"] = bench_launch(build)
    fn_sets = [methods(a, anc, block_mask, flex) for a in copies]
    expected = fn_sets[0]["kernel"]().float()
    for name in METHODS:
        row[name] = row[f"{name}_launch"] = None
        if name not in fn_sets[0]:
            continue
        try:
            row[f"{name}_err"] = (fn_sets[0][name]().float() - expected).abs().max().item()
            row[f"{name}_launch"] = bench_launch(fn_sets[0][name])
            row[name] = bench_graph([fns[name] for fns in fn_sets])
        except Exception as error:  # out of memory, or a method that cannot run this shape: report and go on
            print(f"{name} failed at P={p} T={t}: {type(error).__name__}: {str(error)[:200]}")
            torch.cuda.empty_cache()
    moved = kv_bytes + 2 * args["q"].numel() * args["q"].element_size()
    row["kernel_GBps"] = moved / row["kernel"] / 1e6
    row["of_copy"] = row["kernel_GBps"] / copy_gbps
    return row


def copy_bandwidth(device: str) -> float:
    """GB/s of device-to-device copies, counting bytes read plus bytes written: the best of several sizes
    (on an H100, 128 MiB copies ran faster than 1 GiB ones), so ``of copy`` is against the highest ceiling."""
    best = 0.0
    for size in (2**27, 2**28, 2**30):
        srcs = [torch.randn(size // 4, device=device) for _ in range(max(1, 2**30 // size))]
        dsts = [torch.empty_like(x) for x in srcs]
        ms = bench_graph([lambda d=d, x=x: d.copy_(x) for d, x in zip(dsts, srcs)])
        best = max(best, 2 * size / ms / 1e6)
    return best


def markdown(rows) -> str:
    head = ("| P | T | kernel ms | sdpa ms (x kernel) | hf_sdpa ms (x) | flex ms (x) | eager ms (x) "
            "| kernel GB/s | of copy | kernel launched ms | flex mask build ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["P"], r["T"])):
        cells = [str(r["P"]), str(r["T"]), f"{r['kernel']:.4f}"]
        for name in METHODS[1:]:
            cells.append("—" if r[name] is None else f"{r[name]:.4f} ({r[name] / r['kernel']:.2f}x)")
        cells += [f"{r['kernel_GBps']:.0f}", f"{100 * r['of_copy']:.0f}%",
                  f"{r['kernel_launch']:.4f}", "—" if r.get("flex_mask_ms") is None else f"{r['flex_mask_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SWEEP_SHAPES = [(8192, 32), (32768, 8), (32768, 32), (32768, 128), (131072, 8), (131072, 64)]


def _sweep_case(p: int, t: int, device: str, graph: bool):
    """Inputs of one shape for a sweep: (time one configuration -> (ms or the error's name, max error), dtype).
    With ``graph``, copies of the inputs overflow L2 and each call of a replay reads its own."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args, anc = make_inputs(p, t, device, dtype)
    kv_bytes = 2 * args["k"].numel() * args["k"].element_size()
    copies = [args] + [make_inputs(p, t, device, dtype, seed)[0]
                       for seed in range(1, -(-L2_FLUSH_BYTES // kv_bytes) if graph and device == "cuda" else 1)]
    bits = kernel.pack_visibility(anc)
    expected = kernel.reference(**args, visible=anc)

    def time_it(**options):
        try:
            err = (kernel.tree_attention(**args, bits=bits, **options).double() - expected).abs().max().item()
            calls = [lambda a=a: kernel.tree_attention(**a, bits=bits, **options) for a in copies]
            return (bench_graph(calls) if graph else bench_launch(calls[0])), err
        except Exception as error:  # a configuration that does not fit: record and go on
            return type(error).__name__, None
    return time_it, dtype


def split_sweep(device: str, shapes, splits, graph: bool = False) -> list[dict]:
    """Time the kernel with the prefix cut into each of ``splits`` programs per KV head, with 1 to 3 pipeline
    stages and row blocks of the default height and half of it, the default launch configuration otherwise:
    how the split count trades programs in flight against per-program work and partials, shape by shape."""
    saved = kernel.launch_config
    results = []
    for p, t in shapes:
        time_it, dtype = _sweep_case(p, t, device, graph)
        default_m = saved(HEAD_DIM, HQ // HKV * t, dtype)["BLOCK_M"]
        for block_m, stages, n in itertools.product(sorted({default_m, max(16, default_m // 2)}, reverse=True),
                                                    (1, 2, 3), [None, *splits]):
            kernel.launch_config = lambda *a, bm=block_m, st=stages: dict(saved(*a), BLOCK_M=bm, num_stages=st)
            try:
                ms, err = time_it(num_splits=n)
            finally:
                kernel.launch_config = saved
            results.append(dict(P=p, T=t, BLOCK_M=block_m, num_stages=stages, splits=n or "default", ms=ms, err=err))
            print(results[-1], flush=True)
    return results


def sweep(device: str, shapes, graph: bool = False) -> list[dict]:
    """Time tile sizes, warps, pipelining and the prefix split on representative shapes; ``launch_config`` and
    the split constants of ``kernels/tree_attention.py`` come from this. Launch-timed, or with ``graph`` as the
    table times the kernel (CUDA-graph replays over copies that overflow L2): what a short kernel costs inside
    a captured step, where launch cost would otherwise dominate."""
    saved = kernel.launch_config, kernel.WAVES, kernel.MIN_CHUNK
    results = []
    for p, t in shapes:
        time_it, dtype = _sweep_case(p, t, device, graph)
        for block_n, stages, warps, waves, min_chunk in itertools.product((32, 64, 128), (1, 2, 3), (4, 8), (1, 2, 4),
                                                                          (64, 256, 512)):
            def config(head_dim, rows, dtype, bn=block_n, s=stages, w=warps):
                return dict(saved[0](head_dim, rows, dtype), BLOCK_N=bn, num_stages=s, num_warps=w)
            kernel.launch_config, kernel.WAVES, kernel.MIN_CHUNK = config, waves, min_chunk
            try:
                ms, err = time_it()
            finally:
                kernel.launch_config, kernel.WAVES, kernel.MIN_CHUNK = saved
            results.append(dict(P=p, T=t, BLOCK_N=block_n, num_stages=stages, num_warps=warps, WAVES=waves,
                                MIN_CHUNK=min_chunk, ms=ms, err=err))
        timed = [r for r in results if (r["P"], r["T"]) == (p, t) and isinstance(r["ms"], float)]
        print("best", min(timed, key=lambda r: r["ms"]), flush=True)
        base = saved[0](HEAD_DIM, HQ // HKV * t, dtype)
        chunk, _ = kernel.prefix_split(p, HKV * -(-HQ // HKV * t // base["BLOCK_M"]), base["BLOCK_N"],
                                       torch.device(device))
        default = dict(BLOCK_N=base["BLOCK_N"], num_stages=kernel.pipeline_stages(chunk // base["BLOCK_N"]),
                       num_warps=base["num_warps"],
                       WAVES=saved[1], MIN_CHUNK=saved[2])
        print("default", [r for r in timed if all(r[k] == v for k, v in default.items())], flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--P", type=int, nargs="+")
    parser.add_argument("--T", type=int, nargs="+")
    parser.add_argument("--out", help="JSON file for the rows (rewritten after each row)")
    parser.add_argument("--sweep", action="store_true",
                        help="time launch configurations instead, on --P x --T if given, else on SWEEP_SHAPES")
    parser.add_argument("--graph", action="store_true", help="with --sweep: time CUDA-graph replays, not launches")
    parser.add_argument("--splits", type=int, nargs="+",
                        help="with --sweep: time these prefix splits per KV head instead of launch configurations")
    opts = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.config.recompile_limit = 1000
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}
    print(info, flush=True)
    if opts.sweep:
        shapes = list(itertools.product(opts.P, opts.T)) if opts.P and opts.T else SWEEP_SHAPES
        results = (split_sweep(device, shapes, opts.splits, opts.graph) if opts.splits
                   else sweep(device, shapes, opts.graph))
        if opts.out:
            with open(opts.out, "w") as f:
                json.dump({"info": info, "sweep": results}, f, indent=1)
        return
    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except ImportError as error:
        print(f"flex unavailable: {error}")
    info["copy_GBps"] = copy_bandwidth(device)
    print(f"device-to-device copy: {info['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    rows = []
    for p in opts.P or [512, 2048, 8192, 32768, 131072]:
        for t in opts.T or [8, 32, 64, 128]:
            rows.append(run_row(p, t, device, flex, info["copy_GBps"]))
            print(json.dumps(rows[-1]), flush=True)
            if opts.out:
                with open(opts.out, "w") as f:
                    json.dump({"info": info, "rows": rows}, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
