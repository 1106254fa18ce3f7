"""``specdec demo``: the embedded demo models complete held-out code with plain ``generate`` and with each
drafter; the text is the same, the forward passes are fewer.

On a CPU these models are so small that Python's per-step overhead weighs as much as the model, so
tokens/s understate what speculation does on a GPU; τ (tokens per target forward) carries over. One call's
time swings widely on a shared CPU, so each is the median of ``repeats`` calls with torch's threads pinned.
"""

from __future__ import annotations

import sys

import torch

from . import bench, embedded

LEGEND = """\
τ: new tokens per target forward pass per row (plain decoding: 1). acceptance: drafted tokens the target
accepted, over those drafted (empty where nothing is drafted, or transformers does not say). × fastest
baseline: tokens/s over the fastest non-speculative baseline (eager or static-cache generate); × our
no-drafter: over specdec's own loop with nothing drafted. same text: greedy text equal to model.generate's."""


def run(prompts: int = 3, max_new_tokens: int = 64, device: str = "cpu", progress: bool = True,
        repeats: int = 3, threads: int | None = None) -> dict:
    torch.set_num_threads(threads or torch.get_num_threads())
    models = embedded.load(device=device)
    texts = models.prompts(prompts)
    record = bench.measure(models, texts, modes=("greedy",), max_new_tokens=max_new_tokens, repeats=repeats,
                           progress=progress)
    for prompt, completion in zip(texts, record["completions"]["greedy, batch 1: generate"]):
        print(f"{prompt}\n{'- ' * 8}completion{' -' * 8}\n{completion}\n{'=' * 72}")
    print(bench.table(record["results"]))
    print(f"\n{LEGEND}\ntokens/s: the median of {repeats} calls per prompt, torch on {torch.get_num_threads()} "
          f"threads, {device}.")
    same = all(r["same_text"] for r in record["results"])
    print(f"\nevery strategy wrote the same text as model.generate: {'yes' if same else 'NO'}")
    if torch.device(device).type == "cpu":
        print("(on a CPU, tokens/s understate a GPU's speedup; τ carries over)")
    return record


if __name__ == "__main__":
    from .cli import main

    main(["demo", *sys.argv[1:]])
