"""What fusing an 8B Llama's projections would save at verification shape: cuBLAS GEMMs for M tree nodes.

The 8B step's GEMMs run at 79% (q, o) and 49% (k, v) of copy bandwidth at M=16, against 92% for gate and
up (``docs/benchmarks.md``), and split-K adds a reduction kernel to each small one. This times, per layer
and graph-replayed over 32 layers' own weights (so every weight comes from HBM, as in a step), the
projections as transformers runs them against q/k/v as one GEMM and gate/up as one GEMM.

    python benchmarks/fused_projections.py [--M 1 16 64] [--out fused.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from tree_attention import bench_graph, copy_bandwidth  # the same graph-replay timing and copy ceiling

HIDDEN, INTER, Q, KV, LAYERS = 4096, 14336, 4096, 1024, 32
SHAPES = {"q": (Q, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, Q), "gate": (INTER, HIDDEN),
          "up": (INTER, HIDDEN), "down": (HIDDEN, INTER), "qkv": (Q + 2 * KV, HIDDEN), "gate_up": (2 * INTER, HIDDEN)}
GROUPS = {"q+k+v": ["q", "k", "v"], "qkv fused": ["qkv"], "gate+up": ["gate", "up"], "gate_up fused": ["gate_up"],
          "o": ["o"], "down": ["down"]}


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fused_projections.py times CUDA graphs: it needs a GPU.")
    bandwidth = copy_bandwidth("cuda")
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": bandwidth, "rows": []}
    for group, names in GROUPS.items():
        weights = [{n: torch.randn(SHAPES[n], device="cuda", dtype=torch.bfloat16) for n in names}
                   for _ in range(LAYERS)]
        for m in args.M:
            x = torch.randn(m, SHAPES[names[0]][1], device="cuda", dtype=torch.bfloat16)
            fns = [lambda w=w[n]: F.linear(x, w) for w in weights for n in names]
            us = 1e3 * bench_graph(fns) * len(names)  # bench_graph: per function, here one GEMM of a layer
            nbytes = sum(weights[0][n].numel() * 2 for n in names)
            row = {"group": group, "M": m, "us_per_layer": us, "of_copy": nbytes / us / 1e3 / bandwidth}
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
