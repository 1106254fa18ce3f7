"""Where a fast-path step's GPU time goes, per drafter: kernels by total time over one ``generate`` call, per step.
The call's wall time is split too: a one-token call (the prompt pass and the call's setup), and the rest per step,
so a host-bound step shows apart from a costly call.

By default random-weight models shaped as ``specdec.pretrain``'s ``gpu`` recipe (a 197M target, a 12.6M
draft, Medusa and EAGLE heads on the target) on a random 100-token prompt, no eos: a kernel's cost does not
depend on the weights, only the number of steps does, so times are per step. ``--models DIR`` profiles the
models ``specdec pretrain`` wrote instead (trained heads included), on a held-out prompt with their eos, as
``specdec bench`` runs them; ``--shape`` (with ``--draft-shape``) inflates them first, as ``specdec bench
--shape`` does (``--models embedded``: the pair shipped in the package). bf16, batch 1, greedy.

    python benchmarks/profile_step.py --out profile.json [--models DIR|embedded] [--shape S --draft-shape S]
        [--top 12] [--new-tokens 64] [--compile] [--trace DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specdec
from specdec import embedded, heads
from specdec.inflate import inflate_models

SHAPES = {
    "target": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816),
    "draft": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=1024),
}


def model(shape: str):
    config = LlamaConfig(vocab_size=16384, max_position_embeddings=2048, **SHAPES[shape])
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def random_models():
    """The target, its drafters, a prompt and generation options, all random: no eos, so every call runs
    ``--new-tokens`` tokens."""
    torch.manual_seed(0)
    target, draft = model("target"), model("draft")
    drafters = {"no drafter": None, "prompt lookup": specdec.PromptLookup(10),
                "draft model": specdec.DraftModel(draft, num_draft_tokens=6),
                "medusa": heads.Medusa(heads.MedusaHeads(target, num_heads=4)),
                "eagle": heads.Eagle(heads.EagleHead(target))}
    return target, drafters, torch.randint(16384, (1, 100), device="cuda"), dict(eos_token_id=None)


def trained_models(path: str, shape: str | None, draft_shape: str | None, heads_dir: str):
    """The models in ``path`` ("embedded": the shipped pair), inflated to ``shape`` and ``draft_shape`` where
    given (heads saved under ``heads_dir``), with the drafters ``specdec bench`` builds for them (6 draft
    tokens, 10 lookup tokens), a held-out prompt and the tokenizer's pad token."""
    models = embedded.load(None if path == "embedded" else path, device="cuda", dtype=torch.bfloat16)
    if shape or draft_shape:
        models = inflate_models(models, shape, draft_shape, heads_dir=heads_dir)
    drafters = {"no drafter": None, "prompt lookup": specdec.PromptLookup(10)}
    if models.draft is not None:
        drafters["draft model"] = specdec.DraftModel(models.draft, num_draft_tokens=6)
    for kind in ("medusa", "eagle"):
        if getattr(models, kind) is not None:
            drafters[kind] = heads.load(getattr(models, kind), models.target)
    ids = models.tokenizer(models.prompts(1)[0], return_tensors="pt")["input_ids"].cuda()
    return models.target, drafters, ids, dict(pad_token_id=models.tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="a `specdec pretrain` directory, or `embedded`")
    parser.add_argument("--shape", help="inflate the target (and its heads) to this named shape (specdec.inflate)")
    parser.add_argument("--draft-shape", help="inflate the draft model to this named shape")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="generate(compile=True): drafting's passes too")
    parser.add_argument("--trace", metavar="DIR", help="also write each drafter's call as a Chrome trace, "
                        "host and device, into DIR: where a call's time goes between the kernels")
    parser.add_argument("--out")
    args = parser.parse_args()
    if (args.shape or args.draft_shape) and not args.models:
        parser.error("--shape and --draft-shape inflate trained models: pass --models DIR or --models embedded")
    with tempfile.TemporaryDirectory() as heads_dir:
        found = trained_models(args.models, args.shape, args.draft_shape, heads_dir) if args.models else random_models()
        rows = profile(*found, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "compile": args.compile, "shape": args.shape,
                       "draft_shape": args.draft_shape, "rows": rows}, f, indent=1)


def profile(target, drafters: dict, ids, settings: dict, args) -> list[dict]:
    """One profiled ``generate`` call per drafter, after a capturing call and a timed one: a row each."""
    rows = []
    for name, drafter in drafters.items():
        options = dict(drafter=drafter, max_new_tokens=args.new_tokens, return_dict_in_generate=True,
                       compile=args.compile, **settings)
        specdec.generate(target, ids, **options)  # captures; the timed and profiled calls replay
        wall = timed(target, ids, options)
        fixed = timed(target, ids, {**options, "max_new_tokens": 1})  # the prompt pass and the call's setup
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = specdec.generate(target, ids, **options)
            torch.cuda.synchronize()
        steps = out.stats.steps
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in kernels)
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]
        row = {"drafter": name, "steps": steps, "wall_ms_per_step": round(1e3 * wall / steps, 3),
               "call_setup_ms": round(1e3 * fixed, 3), "step_wall_ms": round(1e3 * (wall - fixed) / steps, 3),
               "gpu_ms_per_step": round(total / 1e3 / steps, 3),
               "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1),
               "top": [{"kernel": e.key[:90], "ms_per_step": round(e.self_device_time_total / 1e3 / steps, 4),
                        "per_step": round(e.count / steps, 1)} for e in top]}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            trace(target, ids, options, f"{args.trace}/trace-{name.replace(' ', '-')}.json")
    return rows


def timed(target, ids, options: dict) -> float:
    """Seconds of one ``generate`` call, the device's work included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    specdec.generate(target, ids, **options)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def trace(target, ids, options: dict, path: str) -> None:
    """One more call, traced on the host and the device, as a Chrome trace at ``path``."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        specdec.generate(target, ids, **options)
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)


if __name__ == "__main__":
    main()
