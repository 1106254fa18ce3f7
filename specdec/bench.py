"""``specdec bench``: every decoding strategy on one target, in one run, on the same prompts.

Plain ``model.generate`` is the baseline; ``specdec`` with no drafter separates the loop's own cost from
what speculation buys; transformers' assisted generation (draft model, prompt lookup) is the strongest
baseline that ships with transformers. Speedups are ratios of tokens/s measured here, in this run.

τ here is new tokens per target forward pass, counted by a hook on the target for every strategy alike
(plain ``generate`` scores 1.0), so it compares transformers' strategies with ours.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from . import heads
from .drafters import DraftModel, PromptLookup
from .embedded import Models
from .generate import generate

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),  # the target's distribution, unwarped
}
BASELINE, ASSISTED, OURS = "generate", "assisted", "specdec"


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str  # BASELINE, ASSISTED or OURS
    run: object  # (input_ids, attention_mask, **generation kwargs) -> (sequences, Stats | None)


def strategies(models: Models, *, draft_tokens: int = 6, lookup_tokens: int = 10) -> list[Strategy]:
    """What ``models`` allows: drafters whose model or heads are missing are left out."""
    target = models.target

    def theirs(**options):
        return lambda ids, mask, **kw: (target.generate(ids, attention_mask=mask, **options, **kw), None)

    def ours(drafter):
        def run(ids, mask, **kw):
            res = generate(target, ids, attention_mask=mask, drafter=drafter, return_dict_in_generate=True, **kw)
            return res.sequences, res.stats
        return run

    found = [Strategy("generate", BASELINE, theirs()), Strategy("specdec, no drafter", OURS, ours(None))]
    if models.draft is not None:
        found.append(Strategy("assisted: draft model", ASSISTED, theirs(assistant_model=models.draft)))
    found.append(Strategy("assisted: prompt lookup", ASSISTED, theirs(prompt_lookup_num_tokens=lookup_tokens)))
    if models.draft is not None:
        found.append(Strategy("specdec: draft model", OURS, ours(DraftModel(models.draft, num_draft_tokens=draft_tokens))))
    found.append(Strategy("specdec: prompt lookup", OURS, ours(PromptLookup(num_draft_tokens=lookup_tokens))))
    for kind in ("medusa", "eagle"):
        if getattr(models, kind) is not None:
            found.append(Strategy(f"specdec: {kind}", OURS, ours(heads.load(getattr(models, kind), target))))
    return found


class ForwardCounter:
    """``with ForwardCounter(model) as counter:`` counts ``model``'s forward passes in ``counter.count``,
    whoever makes them (transformers' loops or ours)."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self) -> "ForwardCounter":
        self._hook = self.model.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()

    def _count(self, module, args):
        self.count += 1


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(models: Models, prompts: list[str], *, modes=("greedy", "sample"), max_new_tokens: int = 128,
            only: list[str] | None = None, seed: int = 0, progress: bool = True, **options) -> dict:
    """Runs every strategy (or those named in ``only``) on each prompt at batch 1, after one untimed warm-up
    call each; returns per-strategy totals and the completions. ``options`` go to ``strategies``."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"`modes` {sorted(unknown)} unknown; choose from {sorted(MODES)}.")
    chosen = strategies(models, **options)
    if only is not None:
        missing = set(only) - {s.name for s in chosen}
        if missing:
            raise ValueError(f"`only` names {sorted(missing)}, which these models do not offer; "
                             f"they offer {[s.name for s in chosen]}.")
        chosen = [s for s in chosen if s.name in only or s.family == BASELINE]
    target, tok = models.target, models.tokenizer
    device = target.device
    inputs = [tok(p, return_tensors="pt").to(device) for p in prompts]
    settings = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    results, texts = [], {}
    total_runs = len(modes) * len(chosen) * (len(inputs) + 1)
    with ForwardCounter(target) as counter, tqdm(total=total_runs, disable=not progress, desc="bench") as bar:
        for mode in modes:
            reference = None
            for strategy in chosen:
                bar.set_description(f"{mode}: {strategy.name}")
                kwargs = {**MODES[mode], **settings}
                torch.manual_seed(seed)
                strategy.run(inputs[0]["input_ids"], inputs[0]["attention_mask"], **kwargs)  # warm-up
                bar.update()
                total = dict(tokens=0, seconds=0.0, forwards=0, drafted=0, accepted=0)
                outputs = []
                for n, x in enumerate(inputs):
                    torch.manual_seed(seed + n)
                    before, start = counter.count, _sync(device)
                    sequences, stats = strategy.run(x["input_ids"], x["attention_mask"], **kwargs)
                    total["seconds"] += _sync(device) - start
                    total["forwards"] += counter.count - before
                    new = sequences[0, x["input_ids"].shape[1]:]
                    outputs.append(new.tolist())
                    total["tokens"] += len(new)
                    if stats is not None:
                        total["drafted"] += stats.drafted_tokens
                        total["accepted"] += stats.accepted_tokens
                    bar.update()
                reference = reference or outputs
                results.append({
                    "mode": mode, "strategy": strategy.name, "family": strategy.family,
                    "tokens": total["tokens"], "seconds": round(total["seconds"], 4),
                    "tokens_per_s": round(total["tokens"] / total["seconds"], 2),
                    "target_forwards": total["forwards"], "tau": round(total["tokens"] / total["forwards"], 3),
                    "acceptance_rate": round(total["accepted"] / total["drafted"], 4) if total["drafted"] else None,
                    "same_text": outputs == reference if mode == "greedy" else None,
                })
                texts[f"{mode}: {strategy.name}"] = [tok.decode(o, skip_special_tokens=True) for o in outputs]
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        base = rows[0]["tokens_per_s"]
        for r in rows:
            r["speedup"] = round(r["tokens_per_s"] / base, 3)
    return {"results": results, "summary": summarize(results), "completions": texts}


def summarize(results: list[dict]) -> dict:
    """Per mode: our fastest strategy, and its speedup over plain ``generate`` and over transformers' fastest
    assisted generation."""
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = [r for r in results if r["mode"] == mode]
        ours = max((r for r in rows if r["family"] == OURS and r["strategy"] != "specdec, no drafter"),
                   key=lambda r: r["tokens_per_s"], default=None)
        theirs = max((r for r in rows if r["family"] == ASSISTED), key=lambda r: r["tokens_per_s"], default=None)
        if ours:
            summary[mode] = {"best": ours["strategy"], "speedup_vs_generate": ours["speedup"]}
            if theirs:
                summary[mode]["best_assisted"] = theirs["strategy"]
                summary[mode]["speedup_vs_assisted"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
    return summary


def table(results: list[dict]) -> str:
    """A Markdown table of ``measure``'s results, ready for the docs."""
    lines = ["| mode | strategy | tokens/s | τ (tokens/forward) | acceptance | speedup | same text |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = "" if r["same_text"] is None else ("yes" if r["same_text"] else "**no**")
        lines.append(f"| {r['mode']} | {r['strategy']} | {r['tokens_per_s']:.1f} | {r['tau']:.2f} | {acc} | "
                     f"{r['speedup']:.2f}x | {same} |")
    return "\n".join(lines)


def environment(models: Models) -> dict:
    device = models.target.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "dtype": str(models.target.dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "target_parameters": models.target.num_parameters(),
        "draft_parameters": models.draft.num_parameters() if models.draft is not None else None,
    }


def write(path: str | Path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1, ensure_ascii=False))
