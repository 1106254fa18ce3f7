"""The ``specdec`` command: ``demo``, ``bench``, ``train-heads`` and ``pretrain``."""

from __future__ import annotations

import argparse
import sys

import torch

DELEGATED = {"train-heads": "specdec.heads.train", "pretrain": "specdec.pretrain"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,train-heads,pretrain}")
    demo = sub.add_parser("demo", help="the embedded models: plain generate against each drafter")
    demo.add_argument("--prompts", type=int, default=3, help="held-out code prompts to complete")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--device", default="cpu")

    bench = sub.add_parser("bench", help="tokens/s, τ and speedup of every strategy, as a table and JSON")
    bench.add_argument("--models", help="a directory `specdec pretrain` wrote (default: the embedded models)")
    for part in ("target", "draft", "medusa", "eagle"):
        bench.add_argument(f"--{part}", help=f"the {part} by its own path, replacing --models'")
    bench.add_argument("--prompts", type=int, default=8, help="held-out code prompts, each run at batch 1")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    bench.add_argument("--only", nargs="+", help="strategies to run besides plain generate (default: all)")
    bench.add_argument("--draft-tokens", type=int, default=6, help="our draft model's chain length")
    bench.add_argument("--lookup-tokens", type=int, default=10, help="prompt lookup's tokens, ours and theirs")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU, float32 on a CPU (where bf16 matmuls are slow)")
    bench.add_argument("--compiled", action="store_true",
                       help="also run each of ours with the target compiled (generate(compile=True))")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", help="write the record as JSON here")
    for name in DELEGATED:
        sub.add_parser(name, help=f"see `specdec {name} --help`", add_help=False)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module = importlib.import_module(DELEGATED[argv[0]])
        sys.argv[0] = f"specdec {argv[0]}"
        return module.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("prompts", "max_new_tokens") + (("draft_tokens", "lookup_tokens") if args.command == "bench" else ()):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive number")
    from transformers.utils import logging

    logging.disable_progress_bar()
    if args.command == "demo":
        from .demo import run

        run(args.prompts, args.max_new_tokens, args.device)
    else:
        _bench(args, argv)


def _bench(args, argv) -> None:
    from . import bench, embedded

    dtype = args.dtype if args.dtype != "auto" else "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    models = embedded.load(args.models, target=args.target, draft=args.draft, medusa=args.medusa, eagle=args.eagle,
                           device=args.device, dtype=getattr(torch, dtype))
    prompts = models.prompts(args.prompts)
    record = bench.measure(models, prompts, modes=args.modes, max_new_tokens=args.max_new_tokens, only=args.only,
                           seed=args.seed, draft_tokens=args.draft_tokens, lookup_tokens=args.lookup_tokens,
                           compiled=args.compiled)
    record = {"command": "specdec bench " + " ".join(argv[1:]), **bench.environment(models),
              "settings": {k: v for k, v in vars(args).items() if k not in ("command", "out")},
              "prompts": prompts, **record}
    print(bench.table(record["results"]))
    for mode, s in record["summary"].items():
        versus = f", {s['speedup_vs_assisted']:.2f}x {s['best_assisted']}" if "best_assisted" in s else ""
        print(f"{mode}: fastest is {s['best']}, {s['speedup_vs_generate']:.2f}x plain generate{versus}")
    if args.out:
        bench.write(args.out, record)
        print(f"wrote {args.out}")
