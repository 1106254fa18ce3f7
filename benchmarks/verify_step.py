"""Time one verification step of an 8B-shaped Llama against its memory-bandwidth floor.

A step is what ``specdec.generate`` runs per verification (``step.verify_step``), greedy, for B rows (``--B``,
1 by default): the target over a T-node tree per row (each node with up to 4 children, breadth first) on a
cache of P tokens per row,
acceptance, compaction and bookkeeping; the sequence and the cache are rewound to P between steps so every
step sees the same state. Weights are
random (cost only), bf16.

- ``step ms``: host wall time per step of the dynamic path, synchronised, median of ``--steps`` after
  warm-up;
- ``graph ms``: the same for the fast path: ``step.verify_step`` with the cache held at a fixed length,
  replayed from a CUDA graph (``specdec.graphs``), the tree copied in and the sequence rewound per step;
- ``compiled ms``: the same with the target's forward fused by ``torch.compile`` (``generate(compile=True)``);
  ``compiled GPU ms``: its span on the GPU alone (CUDA events around the step; the GPU still waits for the
  host to queue the tree's copy into the graph, so a slow host shows here too);
  ``compiled pipelined ms``: ``--steps`` compiled steps queued back to back, then one synchronisation, per
  step: what a step costs inside ``generate``, whose loop queues step k + 1 while the GPU runs step k;
- ``forward ms``: the model pass alone, same timing;
- ``plain decode ms``: one token through the model with transformers' own ``DynamicCache`` of P tokens,
  which is what each step of plain ``model.generate`` costs;
- ``floor ms``: (weight bytes + K/V bytes of P tokens) / the fastest device-to-device copy (read + write
  bytes per second) measured in the same run; ``x floor`` = compiled / floor, ``x floor pipelined`` =
  compiled pipelined / floor. This is the issue's floor, and it counts the input embedding table (1.05 GB
  of an 8B Llama's 16.1), which a step does not read; ``x read floor`` = compiled / the floor without it.

    python benchmarks/verify_step.py --out verify.json [--T 1 16 64] [--P 512 4096] [--B 1 16 64] [--tiny] [--profile]
    python benchmarks/verify_step.py --P 4096 --T 16 --compare fuse=on fuse=off --out fuse.json

Every specdec column runs with the projections fused (``specdec.fusion``), as ``generate`` runs them; plain
decode runs the model as transformers does. ``--tiny`` builds a 2-layer model for a CPU smoke test.
``--compare`` times the compiled step (and profiles its kernels) under each of some settings instead, in
alternating order, twice: ``split=WAVES:MIN_CHUNK`` (the tree-attention kernel's prefix split) or
``fuse=on`` / ``fuse=off``.
``--compile-mode`` passes a ``torch.compile`` mode (``max-autotune-no-cudagraphs``: Inductor's own GEMMs
against cuBLAS's).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import time

import torch
from transformers import DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM

from specdec.attention import head_dim
from specdec import fusion
from specdec.cache import TreeCache
from specdec.forward import Prefix, cache_keyword, forward_nodes, prefill
from specdec.graphs import StepGraphs
from specdec.sampling import Sampling
from specdec.sequences import Sequences
from specdec.step import (COUNTER_SIZE, allow_recompiles, compile_static, compiled_keep_accepted, keep_accepted,
                          verify_step)
from specdec.kernels import tree_attention as tree_kernel
from specdec.tree import Tree

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192)


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_ms(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = _sync(device)
        fn()
        times.append(_sync(device) - start)
    return 1e3 * statistics.median(times)


def _median_gpu_ms(fn, steps: int, device) -> float:
    """Device time from the first kernel ``fn`` queues to its last (CUDA events), median of ``steps``: the
    step's own GPU span, without the host's launch latency."""
    if device.type != "cuda":
        return float("nan")
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _pipelined_ms(fn, steps: int, warmup: int, device) -> float:
    """Wall time per call of ``steps`` calls queued with no synchronisation between them."""
    for _ in range(warmup):
        fn()
    start = _sync(device)
    for _ in range(steps):
        fn()
    return 1e3 * (_sync(device) - start) / steps


def copy_bandwidth(device) -> float:
    """Bytes moved (read + write) per second by the fastest of a few device-to-device copies."""
    if device.type != "cuda":
        return float("nan")
    best = 0.0
    for mib in (128, 256, 1024):
        src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = _median_ms(lambda: dst.copy_(src), 20, 3, device)
        best = max(best, 2 * src.numel() / (ms / 1e3))
    return best


def build_model(shape: dict, device, dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def tree_of(t: int, vocab: int, root: torch.Tensor) -> Tree:
    """A ``t``-node tree for each row of ``root`` (B,)."""
    batch = root.shape[0]
    parents = torch.tensor([-1] + [(i - 1) // 4 for i in range(1, t)], device=root.device)
    tokens = torch.randint(vocab, (batch, t), device=root.device)
    tokens[:, 0] = root
    return Tree(tokens=tokens, parents=parents.expand(batch, -1),
                valid=torch.ones(batch, t, dtype=torch.bool, device=root.device))


class StepBench:
    """One (B, P, T) setting: an 8B step's state and the ways of running it, each a callable that leaves the
    state as it found it."""

    def __init__(self, model, p: int, t: int, compile_mode: str | None = None, batch: int = 1):
        device, vocab = model.device, model.config.vocab_size
        self.model, self.p = model, p
        allow_recompiles()  # a static graph per (B, T), more than Dynamo's default 8
        self.compiled_model = compile_static(model, compile_mode)  # as generate(compile=True); at its first call
        prompt = torch.randint(vocab, (batch, p + 1), device=device)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)
        # A sequence of P + 1 tokens, the last the tree's root; one cache for each path, P tokens each.
        self.seqs = Sequences.from_prompt(prompt, torch.ones_like(prompt), max_new_tokens=64)
        self.cache, self.held_cache = TreeCache(self.seqs.tokens.shape[1]), TreeCache(self.seqs.tokens.shape[1])
        prefill(model, self.cache, prompt[:, :p], self.start)
        prefill(model, self.held_cache, prompt[:, :p], self.start)
        self.held_cache.hold(self.seqs.limit)
        self.tree = tree_of(t, vocab, prompt[:, p])
        self.positions = p + self.tree.depth
        self.sampling = Sampling.from_config(GenerationConfig(do_sample=False))
        self.counters = torch.zeros(COUNTER_SIZE, dtype=torch.long, device=device)
        self.dynamic = DynamicCache(config=model.config)
        model(prompt[:, :p], **{cache_keyword(model): self.dynamic}, use_cache=True)
        self.prompt = prompt

    def rewind(self):  # the held cache needs none: its length never moves
        self.seqs.end.fill_(self.p + 1)
        self.seqs.finished.zero_()

    def forward(self):
        forward_nodes(self.model, self.cache, self.tree.tokens, self.positions, Prefix(self.start, self.seqs.end - 1),
                      self.tree.ancestors, self.positions)
        self.cache.crop(self.p)

    def step(self):
        verify_step(self.model, self.cache, self.seqs, self.tree, self.sampling, self.counters, False)
        self.rewind()
        self.cache.crop(self.p)

    def replayed(self, compiled: bool):
        """The fast path's step (``compiled``: as ``generate(compile=True)`` runs it), replayed from a CUDA
        graph on a GPU. Each call captures anew, so it takes up kernel settings changed since the last."""
        target, keep = (self.compiled_model, compiled_keep_accepted()) if compiled else (self.model, keep_accepted)
        graphs = StepGraphs(enabled=self.model.device.type == "cuda")

        def held_step(tree):
            return verify_step(target, self.held_cache, self.seqs, tree, self.sampling, self.counters, False, keep)

        def run():
            graphs.run(held_step, (self.tree.shape, self.seqs.tokens.shape[1], self.held_cache.capacity), self.tree)
            self.rewind()
        return run

    def plain_decode(self):
        self.model(self.prompt[:, self.p:], **{cache_keyword(self.model): self.dynamic}, use_cache=True)
        self.dynamic.crop(-1)


def floor_ms(model, p: int, copy_bps: float, batch: int = 1) -> dict:
    """The issue's floor counts every weight; ``read floor`` leaves out the input embedding table, of which a
    step reads only its T rows (unless it is tied to the output layer, which reads it all)."""
    cfg = model.config
    weight_bytes = sum(x.numel() * x.element_size() for x in model.parameters())
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * p * batch * model.dtype.itemsize
    embed = model.get_input_embeddings().weight
    unread = 0 if embed is model.get_output_embeddings().weight else embed.numel() * embed.element_size()
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "unread_embedding_bytes": unread,
            "floor_ms": 1e3 * (weight_bytes + kv_bytes) / copy_bps,
            "read_floor_ms": 1e3 * (weight_bytes + kv_bytes - unread) / copy_bps}


def compiled_columns(run, steps: int, warmup: int, device, floor: dict) -> dict:
    """The compiled step's three timings (see the module's docstring), ``floor`` and the ratios to it."""
    row = {"compiled_ms": _median_ms(run, steps, warmup, device),
           "compiled_gpu_ms": _median_gpu_ms(run, steps, device),
           "compiled_pipelined_ms": _pipelined_ms(run, steps, warmup, device), **floor}
    row["x_floor"] = row["compiled_ms"] / floor["floor_ms"]
    row["x_floor_pipelined"] = row["compiled_pipelined_ms"] / floor["floor_ms"]
    row["x_read_floor"] = row["compiled_ms"] / floor["read_floor_ms"]
    return row


@torch.no_grad()
def run_row(model, p: int, t: int, steps: int, warmup: int, copy_bps: float, profile: bool = False,
            compile_mode: str | None = None, batch: int = 1) -> dict:
    bench, device = StepBench(model, p, t, compile_mode, batch), model.device
    row = {"B": batch, "P": p, "T": t, "plain_decode_ms": _median_ms(bench.plain_decode, steps, warmup, device)}
    with fusion.fused(model):
        graph_step, compiled_graph_step = bench.replayed(False), bench.replayed(True)
        row.update(step_ms=_median_ms(bench.step, steps, warmup, device),
                   graph_ms=_median_ms(graph_step, steps, warmup, device),
                   **compiled_columns(compiled_graph_step, steps, warmup, device, floor_ms(model, p, copy_bps, batch)),
                   forward_ms=_median_ms(bench.forward, steps, warmup, device))
        if profile and device.type == "cuda":
            row["kernels_ms"] = kernel_times(graph_step)
            row["compiled_kernels_ms"] = kernel_times(compiled_graph_step)
    return row


@contextlib.contextmanager
def setting(name: str, model):
    """``split=WAVES:MIN_CHUNK``: the tree-attention kernel's prefix split; ``fuse=on|off``: projections fused
    or not (fused under any other setting, as ``generate`` runs them)."""
    kind, _, value = name.partition("=")
    if kind == "fuse" and value in ("on", "off"):
        with fusion.fused(model) if value == "on" else contextlib.nullcontext():
            yield
    elif kind == "split":
        saved = tree_kernel.WAVES, tree_kernel.MIN_CHUNK
        tree_kernel.WAVES, tree_kernel.MIN_CHUNK = (int(x) for x in value.split(":"))
        try:
            with fusion.fused(model):
                yield
        finally:
            tree_kernel.WAVES, tree_kernel.MIN_CHUNK = saved
    else:
        raise ValueError(f"--compare: unknown setting {name!r}; use split=WAVES:MIN_CHUNK or fuse=on|off")


@torch.no_grad()
def compare(model, p: int, t: int, settings: list[str], steps: int, warmup: int, copy_bps: float,
            compile_mode: str | None = None, repeats: int = 2) -> list[dict]:
    """The compiled step under each setting, in alternating order over ``repeats`` rounds (neighbouring runs
    share the GPU's state)."""
    bench, device = StepBench(model, p, t, compile_mode), model.device
    rows = []
    for repeat in range(repeats):
        for name in settings if repeat % 2 == 0 else settings[::-1]:
            with setting(name, model):
                run = bench.replayed(True)
                row = {"P": p, "T": t, "setting": name, "repeat": repeat,
                       **compiled_columns(run, steps, warmup, device, floor_ms(model, p, copy_bps))}
                if device.type == "cuda":
                    row["kernels_ms"] = kernel_times(run, top=40)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels_ms"}), flush=True)
    return rows


def kernel_times(run, top: int = 12) -> dict:
    """Where a step's GPU time goes: device ms of its costliest kernels (with their launch counts) over one
    ``run()`` (a replayed graph, so the kernels the step really runs), the total, and how many kernels ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    times = {f"{e.key[:90]} (x{e.count})": round(e.self_device_time_total / 1e3, 3) for e in events[:top]}
    times["all kernels"] = round(sum(e.self_device_time_total for e in events) / 1e3, 3)
    times["kernel count"] = sum(e.count for e in events if e.self_device_time_total > 0)
    return times


def markdown(rows) -> str:
    lines = ["| B | P | T | step ms (dynamic) | graph ms (fast path) | compiled ms (fast path, compile=True) | "
             "compiled GPU ms | compiled pipelined ms | forward ms | plain decode ms | floor ms | x floor | "
             "x floor pipelined | x read floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['B']} | {r['P']} | {r['T']} | {r['step_ms']:.2f} | {r['graph_ms']:.2f} | "
              f"{r['compiled_ms']:.2f} | {r['compiled_gpu_ms']:.2f} | {r['compiled_pipelined_ms']:.2f} | "
              f"{r['forward_ms']:.2f} | {r['plain_decode_ms']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
              f"{r['x_floor_pipelined']:.2f} | {r['x_read_floor']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--P", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--T", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--B", type=int, nargs="+", default=[1], help="rows per step (each its own tree)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a CPU smoke test")
    parser.add_argument("--profile", action="store_true", help="record each row's costliest kernels (GPU)")
    parser.add_argument("--compare", nargs="+", metavar="SETTING",
                        help="instead of the table: the compiled step under each setting (split=WAVES:MIN_CHUNK, the "
                             "tree-attention kernel's prefix split; fuse=on|off, the projections), at the first P and T")
    parser.add_argument("--compile-mode", help="a torch.compile mode for the compiled column")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(TINY if args.tiny else LLAMA_8B, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    copy_bps = copy_bandwidth(device)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": "tiny" if args.tiny else "llama-8b-shaped, random bf16",
              "compile_mode": args.compile_mode, "copy_GBps": copy_bps / 1e9, "rows": []}
    if args.compare:
        record["rows"] = compare(model, args.P[0], args.T[0], args.compare, args.steps, args.warmup, copy_bps,
                                 args.compile_mode)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
        return
    for b, p, t in itertools.product(args.B, args.P, args.T):
        record["rows"].append(run_row(model, p, t, args.steps, args.warmup, copy_bps, args.profile,
                                      args.compile_mode, b))
        print(markdown(record["rows"][-1:]).splitlines()[-1], flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
    print(markdown(record["rows"]))


if __name__ == "__main__":
    main()
