"""``specdec bench``: every decoding strategy on one target, in one run, on the same prompts.

Plain ``model.generate`` is the baseline; ``specdec`` with no drafter separates the loop's own cost from
what speculation buys; transformers' assisted generation (draft model, prompt lookup) is the strongest
baseline that ships with transformers. Speedups are ratios of tokens/s measured here, in this run.

τ here is new tokens per target forward pass (plain ``generate`` scores 1.0): for transformers' strategies
counted by a hook on the target, for ours by the loop's own count, which also sees the passes replayed
from a CUDA graph (where no Python and so no hook runs).

On a GPU our strategies run twice: on the fast path (each step replayed from a CUDA graph, the default)
and on the dynamic path, and each strategy's *GPU busy* share is measured: kernel time from the profiler
over the wall time of the same call, so one minus it is the share of time the GPU waits for the host.
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
NO_DRAFTER = "specdec, no drafter"  # and its ", dynamic" and ", compiled" variants


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str  # BASELINE, ASSISTED or OURS
    run: object  # (input_ids, attention_mask, **generation kwargs) -> (sequences, Stats | None)
    # Compiles the target: a prompt too long for the buffers kept so far (``specdec.session``) recompiles it,
    # so it warms up on every prompt, and the timed calls measure the compiled code.
    compiles: bool = False


def strategies(models: Models, *, draft_tokens: int = 6, lookup_tokens: int = 10,
               dynamic: bool | None = None, compiled: bool = False) -> list[Strategy]:
    """What ``models`` allows: drafters whose model or heads are missing are left out. ``dynamic`` adds each
    of ours again on the dynamic path, named "..., dynamic" (default: on a GPU, where the paths differ);
    ``compiled`` adds each with the target compiled (``generate(compile=True)``), named "..., compiled"."""
    target = models.target
    if dynamic is None:
        dynamic = target.device.type == "cuda"

    def theirs(**options):
        return lambda ids, mask, **kw: (target.generate(ids, attention_mask=mask, **options, **kw), None)

    def ours(drafter, **options):
        def run(ids, mask, **kw):
            res = generate(target, ids, attention_mask=mask, drafter=drafter, return_dict_in_generate=True,
                           **options, **kw)
            return res.sequences, res.stats
        return run

    drafters = {NO_DRAFTER: None}
    if models.draft is not None:
        drafters["specdec: draft model"] = DraftModel(models.draft, num_draft_tokens=draft_tokens)
    drafters["specdec: prompt lookup"] = PromptLookup(num_draft_tokens=lookup_tokens)
    for kind in ("medusa", "eagle"):
        if getattr(models, kind) is not None:
            drafters[f"specdec: {kind}"] = heads.load(getattr(models, kind), target)

    found = [Strategy("generate", BASELINE, theirs())]
    for name, drafter in drafters.items():
        found.append(Strategy(name, OURS, ours(drafter)))
        if dynamic:
            found.append(Strategy(f"{name}, dynamic", OURS, ours(drafter, fast_path=False)))
        if compiled:
            found.append(Strategy(f"{name}, compiled", OURS, ours(drafter, compile=True), compiles=True))
        if drafter is None:  # transformers' assisted generation after our loop's own cost
            if models.draft is not None:
                found.append(Strategy("assisted: draft model", ASSISTED, theirs(assistant_model=models.draft)))
            found.append(Strategy("assisted: prompt lookup", ASSISTED,
                                  theirs(prompt_lookup_num_tokens=lookup_tokens)))
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


def _graphs_compiled() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far: a timed call that adds to it spent part of
    its time compiling, and the bench records that instead of hiding it."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def gpu_busy_seconds(run, device: torch.device) -> float | None:
    """Kernel and copy time on the GPU during ``run()``, from the profiler (None off a GPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize(device)
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6


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
    total_runs = len(modes) * sum((len(inputs) if s.compiles else 1) + len(inputs) for s in chosen)
    with ForwardCounter(target) as counter, tqdm(total=total_runs, disable=not progress, desc="bench") as bar:
        for mode in modes:
            reference = None
            for strategy in chosen:
                bar.set_description(f"{mode}: {strategy.name}")
                kwargs = {**MODES[mode], **settings}
                for x in inputs if strategy.compiles else inputs[:1]:  # warm-up
                    torch.manual_seed(seed)
                    strategy.run(x["input_ids"], x["attention_mask"], **kwargs)
                    bar.update()
                compiled_before = _graphs_compiled()
                total = dict(tokens=0, seconds=0.0, forwards=0, drafted=0, accepted=0)
                outputs, seconds = [], []
                for n, x in enumerate(inputs):
                    torch.manual_seed(seed + n)
                    before, start = counter.count, _sync(device)
                    sequences, stats = strategy.run(x["input_ids"], x["attention_mask"], **kwargs)
                    seconds.append(_sync(device) - start)
                    total["seconds"] += seconds[-1]
                    total["forwards"] += counter.count - before if stats is None else stats.target_forwards
                    new = sequences[0, x["input_ids"].shape[1]:]
                    outputs.append(new.tolist())
                    total["tokens"] += len(new)
                    if stats is not None:
                        total["drafted"] += stats.drafted_tokens
                        total["accepted"] += stats.accepted_tokens
                    bar.update()
                reference = reference or outputs
                compiled_while_timed = _graphs_compiled() - compiled_before
                torch.manual_seed(seed)
                busy = gpu_busy_seconds(lambda: strategy.run(inputs[0]["input_ids"], inputs[0]["attention_mask"],
                                                             **kwargs), device)
                results.append({
                    "mode": mode, "strategy": strategy.name, "family": strategy.family,
                    "tokens": total["tokens"], "seconds": round(total["seconds"], 4),
                    "tokens_per_s": round(total["tokens"] / total["seconds"], 2),
                    "target_forwards": total["forwards"], "tau": round(total["tokens"] / total["forwards"], 3),
                    "acceptance_rate": round(total["accepted"] / total["drafted"], 4) if total["drafted"] else None,
                    "same_text": outputs == reference if mode == "greedy" else None,
                    "gpu_busy": None if busy is None else round(min(busy / seconds[0], 1.0), 3),
                    "compiled_while_timed": compiled_while_timed,
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
        ours = max((r for r in rows if r["family"] == OURS and not r["strategy"].startswith(NO_DRAFTER)),
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
    lines = ["| mode | strategy | tokens/s | τ (tokens/forward) | acceptance | speedup | same text | GPU busy |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in results:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = "" if r["same_text"] is None else ("yes" if r["same_text"] else "**no**")
        busy = "" if r.get("gpu_busy") is None else f"{100 * r['gpu_busy']:.0f}%"
        compiling = "†" if r.get("compiled_while_timed") else ""
        lines.append(f"| {r['mode']} | {r['strategy']} | {r['tokens_per_s']:.1f}{compiling} | {r['tau']:.2f} | {acc} | "
                     f"{r['speedup']:.2f}x | {same} | {busy} |")
    if any(r.get("compiled_while_timed") for r in results):
        lines.append("\n† torch.compile compiled during the timed calls: not the steady state.")
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
