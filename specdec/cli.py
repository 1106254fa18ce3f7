"""The ``specdec`` command: ``demo``, ``bench``, ``inflate``, ``train-heads`` and ``pretrain``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .inflate import SHAPES

DELEGATED = {"train-heads": "specdec.heads.train", "pretrain": "specdec.pretrain"}


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth saying (not None, not an off flag)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,inflate,train-heads,pretrain}")
    demo = sub.add_parser("demo", formatter_class=HelpWithDefaults,
                          help="the embedded models: plain generate against each drafter")
    demo.add_argument("--prompts", type=int, default=3, help="held-out code prompts to complete")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--repeats", type=int, default=3, help="timed calls per prompt; tokens/s from their median")
    demo.add_argument("--threads", type=int, help="torch threads, fixed for the run (default: torch's)")

    _bench_parser(sub)
    _inflate_parser(sub)
    for name in DELEGATED:
        sub.add_parser(name, help=f"see `specdec {name} --help`", add_help=False)
    return parser


def _bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench", formatter_class=HelpWithDefaults,
        help="tokens/s, τ and speedups of every strategy against the baselines, as a table and JSON",
        description="Baselines, in the same run: generate (transformers, eager: the reference text); generate, "
                    "static cache (transformers compiles its decode step on a GPU); assisted: draft model and "
                    "assisted: prompt lookup (transformers, batch 1); gpt-fast: plain and gpt-fast: speculative "
                    "(with --peer gpt-fast=PATH, batch 1). Then ours: no drafter, draft model, prompt lookup, "
                    "medusa, eagle. Speedups are against the fastest non-speculative baseline and against our "
                    "no-drafter path.")
    bench.add_argument("--models", help="a directory `specdec pretrain` wrote (default: the embedded models)")
    for part in ("target", "draft", "medusa", "eagle"):
        bench.add_argument(f"--{part}", help=f"the {part} by its own path, replacing --models'")
    bench.add_argument("--shape", help="inflate the target to this shape first (function-preserving; "
                       f"heads with it): {', '.join(tuple(SHAPES))}")
    bench.add_argument("--draft-shape", help="inflate the draft model to this shape first")
    bench.add_argument("--prompts", type=int, default=8, help="prompts: held-out code, half from --prompts-from")
    bench.add_argument("--prompts-from", metavar="DIR", help="a directory of Python code no recipe reads, for "
                       "half of the prompts (a second held-out set)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="ragged, left-padded batches")
    bench.add_argument("--calls", type=int, default=4, help="timed calls (batches) per cell, at most")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"],
                       help="sample: temperature 0.7")
    bench.add_argument("--only", nargs="+", help="strategies to run besides the baselines (default: all)")
    bench.add_argument("--peer", action="append", default=[], metavar="NAME=PATH",
                       help="an external peer to time beside ours: gpt-fast=PATH (a gpt-fast checkout)")
    bench.add_argument("--draft-tokens", type=int, default=6, help="our draft model's chain length, and gpt-fast's k")
    bench.add_argument("--lookup-tokens", type=int, default=10, help="prompt lookup's tokens, ours and theirs")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU, float32 on a CPU (where bf16 matmuls are slow)")
    bench.add_argument("--dynamic", action="store_true", help="also run each of ours on the dynamic path")
    bench.add_argument("--compiled", action="store_true",
                       help="also run each of ours with the target compiled (generate(compile=True))")
    bench.add_argument("--auto", action="store_true",
                       help="also run each drafter with speculation='auto' (the others draft every step)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", help="write the record as JSON here, and the table as Markdown beside it")


def _inflate_parser(sub) -> None:
    inflate = sub.add_parser(
        "inflate", formatter_class=HelpWithDefaults,
        help="rewrite a model at a larger shape that computes the same function",
        description="SRC is a model directory (save_pretrained) or a directory `specdec pretrain` wrote; from the "
                    "latter the target is inflated to --shape with its heads, and the draft to --draft-shape.")
    inflate.add_argument("src")
    inflate.add_argument("out")
    inflate.add_argument("--shape", required=True, help=f"{', '.join(tuple(SHAPES))}, or HIDDEN,LAYERS,"
                         "INTERMEDIATE,HEADS,KV_HEADS,HEAD_DIM")
    inflate.add_argument("--draft-shape", help="the draft's shape (without it the draft is copied as it is)")
    inflate.add_argument("--device", default="cpu", help="where to build it (a GPU is far faster at 8B and up)")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module = importlib.import_module(DELEGATED[argv[0]])
        sys.argv[0] = f"specdec {argv[0]}"
        return module.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    numbers = {"demo": ("prompts", "max_new_tokens", "repeats"), "inflate": (),
               "bench": ("prompts", "max_new_tokens", "draft_tokens", "lookup_tokens", "calls")}[args.command]
    for name in numbers:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive number")
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        if args.command == "demo":
            from .demo import run

            run(args.prompts, args.max_new_tokens, args.device, repeats=args.repeats, threads=args.threads)
        elif args.command == "inflate":
            _inflate(args)
        else:
            _bench(args, argv)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, not a traceback
        parser.exit(2, f"specdec {args.command}: error: {error}\n")


def _shape(text: str | None):
    from .inflate import SHAPES, Shape

    if text is None or text in SHAPES:
        return text
    try:
        return Shape(*(int(part) for part in text.split(",")))
    except (TypeError, ValueError):
        raise ValueError(f"--shape {text!r}: name one of {sorted(SHAPES)} or give HIDDEN,LAYERS,INTERMEDIATE,"
                         "HEADS,KV_HEADS,HEAD_DIM") from None


def _peers(pairs: list[str]) -> dict:
    peers = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    if len(peers) != len(pairs):
        raise ValueError(f"--peer {pairs}: give NAME=PATH, e.g. gpt-fast=../shared/peers/gpt-fast")
    return peers


def _prompts(models, args) -> tuple[list[str], list[str]]:
    """The bench's prompts, and where they came from: held-out stdlib functions, and with ``--prompts-from``
    half of them from that directory, interleaved so that every batch mixes both."""
    from .corpus import HELD_OUT, directory_prompts

    sources = [f"held-out standard library modules {list(HELD_OUT)}"]
    if not args.prompts_from:
        return models.prompts(args.prompts), sources
    theirs = directory_prompts(args.prompts_from, args.prompts // 2)
    ours = models.prompts(args.prompts - len(theirs))
    sources.append(f"functions of the Python files under {args.prompts_from}")
    mixed = [p for pair in zip(ours, theirs) for p in pair] + ours[len(theirs):]
    return mixed, sources


def _bench(args, argv) -> None:
    import tempfile

    from . import bench, embedded
    from .inflate import inflate_models

    dtype = args.dtype if args.dtype != "auto" else "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    peers = _peers(args.peer)
    models = embedded.load(args.models, target=args.target, draft=args.draft, medusa=args.medusa, eagle=args.eagle,
                           device=args.device, dtype=getattr(torch, dtype))
    prompts, sources = _prompts(models, args)
    def save_partial(results):  # a run cut short keeps the cells it finished
        if args.out:
            bench.write(args.out, {"command": "specdec bench " + " ".join(argv[1:]), "partial": True, "results": results})

    with tempfile.TemporaryDirectory() as heads_dir:
        if args.shape or args.draft_shape:
            models = inflate_models(models, _shape(args.shape), _shape(args.draft_shape), heads_dir=heads_dir)
        record = bench.measure(models, prompts, modes=args.modes, batch_sizes=args.batch_sizes, calls=args.calls,
                               max_new_tokens=args.max_new_tokens, only=args.only, seed=args.seed, peers=peers,
                               draft_tokens=args.draft_tokens, lookup_tokens=args.lookup_tokens,
                               compiled=args.compiled, auto=args.auto, dynamic=args.dynamic,
                               after_cell=save_partial)
    record = {"command": "specdec bench " + " ".join(argv[1:]), **bench.environment(models),
              "settings": {k: v for k, v in vars(args).items() if k not in ("command", "out")},
              "prompt_sources": sources, "prompts": prompts, **record}
    markdown = bench.table(record["results"])
    print(markdown)
    for cell, s in record["summary"].items():
        if "best_ours" in s:
            print(f"{cell}: our fastest is {s['best_ours']}, {s['x_fastest_baseline']:.2f}x {s['fastest_baseline']} "
                  f"and {s['x_no_drafter']:.2f}x our no-drafter path; fastest of all: {s['fastest']}")
    if args.out:
        bench.write(args.out, record)
        Path(args.out).with_suffix(".md").write_text(markdown + "\n")
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


def _inflate(args) -> None:
    from .inflate import inflate_directory

    for line in inflate_directory(args.src, args.out, _shape(args.shape), _shape(args.draft_shape), args.device):
        print(line)
