"""``specdec demo``: the embedded demo models complete held-out code with plain ``generate`` and with each
drafter; the text is the same, the forward passes are fewer.

On a CPU these models are so small that Python's per-step overhead weighs as much as the model, so
tokens/s understate what speculation does on a GPU; τ (tokens per target forward) carries over.
"""

from __future__ import annotations

import sys

import torch

from . import bench, embedded


def run(prompts: int = 3, max_new_tokens: int = 64, device: str = "cpu", progress: bool = True) -> dict:
    models = embedded.load(device=device)
    texts = models.prompts(prompts)
    record = bench.measure(models, texts, modes=("greedy",), max_new_tokens=max_new_tokens, progress=progress)
    dim, plain = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for prompt, completion in zip(texts, record["completions"]["greedy, batch 1: generate"]):
        print(f"{dim}{prompt}{plain}{completion}\n{'-' * 72}")
    print(bench.table(record["results"]))
    same = all(r["same_text"] for r in record["results"])
    print(f"\nevery strategy wrote the same text as model.generate: {'yes' if same else 'NO'}")
    if torch.device(device).type == "cpu":
        print("(on a CPU, tokens/s understate a GPU's speedup; τ carries over)")
    return record


if __name__ == "__main__":
    from .cli import main

    main(["demo", *sys.argv[1:]])
