"""Whole ``generate`` calls on the fast path, with what it keeps between calls (``specdec.session``) and without.

Per prompt, per drafter: ``specdec.release`` and a timed call (``released``: the call allocates its buffers,
runs each step shape's first step eagerly and captures the second, as every call did before sessions),
then the same call again (``kept``: every step replays a graph the first captured). Batch 1, greedy, the
embedded demo models or a ``--models`` directory (``specdec pretrain``'s output), on a GPU.

    python benchmarks/calls.py --out calls.json [--models DIR] [--dtype bfloat16] [--prompts 8] [--max-new-tokens 32 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import specdec
from specdec import bench, embedded, session


def captured(model) -> int:
    """Steps captured as CUDA graphs and kept for ``model`` (``specdec.session``) so far."""
    kept = session._sessions.get(model)
    return 0 if kept is None else sum(g is not None for graphs in kept.recipes.values() for g in graphs.values())


def timed(run, ids, mask, **options) -> tuple[float, int]:
    """Seconds and new tokens of one call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    sequences, _ = run(ids, mask, **options)
    torch.cuda.synchronize()
    return time.perf_counter() - start, sequences.shape[1] - ids.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--out")
    args = parser.parse_args()

    models = embedded.load(args.models, device="cuda", dtype=getattr(torch, args.dtype))
    tok = models.tokenizer
    inputs = [tok(p, return_tensors="pt").to("cuda") for p in models.prompts(args.prompts)]
    chosen = [s for s in bench.strategies(models, dynamic=False) if s.family == bench.OURS]
    rows = []
    for new in args.max_new_tokens:
        options = dict(max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        for strategy in chosen:
            strategy.run(inputs[0]["input_ids"], inputs[0]["attention_mask"], **options)  # kernels, cuBLAS
            times = {"released": [], "kept": []}
            tokens = captures = 0
            for x in inputs:
                specdec.release(models.target)
                if models.draft is not None:
                    specdec.release(models.draft)
                times["released"].append(timed(strategy.run, x["input_ids"], x["attention_mask"], **options)[0])
                before = captured(models.target)
                seconds, n = timed(strategy.run, x["input_ids"], x["attention_mask"], **options)
                times["kept"].append(seconds)
                tokens, captures = tokens + n, captures + captured(models.target) - before
            row = {"strategy": strategy.name, "max_new_tokens": new, "tokens": tokens,
                   "graphs_captured_by_kept_calls": captures}
            for name, values in times.items():
                row[f"{name}_ms_per_call"] = round(1e3 * statistics.median(values), 2)
                row[f"{name}_tokens_per_s"] = round(tokens / sum(values), 1)
            row["kept_speedup"] = round(row["kept_tokens_per_s"] / row["released_tokens_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| strategy | new tokens | released ms/call | kept ms/call | released tok/s | kept tok/s | kept / released |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['strategy']} | {r['max_new_tokens']} | {r['released_ms_per_call']} | {r['kept_ms_per_call']} | "
              f"{r['released_tokens_per_s']} | {r['kept_tokens_per_s']} | {r['kept_speedup']}x |")
    if args.out:
        record = {"environment": bench.environment(models), "prompts": args.prompts, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
