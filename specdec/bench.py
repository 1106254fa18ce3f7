"""``specdec bench``: every decoding strategy on one target, in one run, on the same prompts and batches.

Speedups compare what a user could run instead, measured in the same process:

- ``generate``: transformers' eager ``generate``, the reference whose greedy text every other strategy is
  checked against;
- ``generate, static cache``: ``generate`` with a ``StaticCache`` passed in, sized once per batch size so that a
  new prompt length neither reallocates it nor recompiles; on a GPU transformers compiles its decode step
  (``torch.compile``, CUDA graphs) by itself;
- ``assisted: ...``: transformers' assisted generation, with the draft model and with prompt lookup (batch 1);
- ``gpt-fast: plain`` / ``gpt-fast: speculative``: an external checkout of gpt-fast, when its path is given
  (``peers``; batch 1, compiled on a GPU as its own ``main`` compiles);
- ours, with no drafter (the loop's own cost) and with each drafter.

Each strategy's tokens/s is reported against the fastest non-speculative baseline of the same mode and batch
size (eager ``generate``, the static cache, gpt-fast plain), and against our own no-drafter path, so that what
speculation itself buys is visible. τ is new tokens per target forward pass per row (plain decoding scores
1): counted by a hook on the target for assisted generation (batch 1), by gpt-fast's acceptance counts for
gpt-fast (batch 1), and for ours by the loop's own counters (which also see the passes replayed from a CUDA
graph) as ``Stats.tau`` does: per verification step, over the rows still generating, so that rows of a batch
that finished early do not pull it below 1.

Rows stop at eos; gpt-fast does not, so its tokens are all it generated and its text is compared up to the
reference's length. *GPU busy* is kernel time from the profiler over the wall time of one more call of the
same cell; *peak* is the most memory allocated on the GPU during the cell's timed calls, all loaded models
included, after what earlier strategies kept was released.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .embedded import Models
from .forward import cache_keyword
from .generate import generate
from .session import measured_costs, release

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0),  # the target's distribution at T=0.7
}
REFERENCE, BASELINE, ASSISTED, PEER, OURS = "reference", "baseline", "assisted", "peer", "specdec"
NON_SPECULATIVE = (REFERENCE, BASELINE)
NO_DRAFTER = "specdec, no drafter"  # and its ", dynamic" and ", compiled" variants
PEERS = ("gpt-fast",)


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str  # REFERENCE, BASELINE, ASSISTED, PEER or OURS
    # (input_ids (B, P), attention_mask (B, P), **generation kwargs) -> (sequences (B, P + N), counts or None):
    # counts = {"forwards": target passes, "drafted": drafted tokens, "accepted": accepted drafted tokens,
    # and for ours "row_steps": verification steps summed over the rows still generating at each, "steps" and
    # "plain_steps": steps, and those that drafted nothing}.
    run: object
    # It warms up on every batch, so the timed calls measure what it compiles or captures per shape. Ours do:
    # warmed on the first batch alone, a later, longer prompt outgrew the kept session in a timed call, and the
    # call captured its steps again (and "auto" measured its costs again).
    warms_every_batch: bool = False
    batch_one: bool = False  # runs at batch 1 only (transformers' assisted generation, gpt-fast)


def strategies(models: Models, *, draft_tokens: int = 6, lookup_tokens: int = 10, dynamic: bool | None = None,
               compiled: bool = False, auto: bool = False, peers: dict | None = None,
               max_length: int = 1024) -> list[Strategy]:
    """What ``models`` and ``peers`` ({"gpt-fast": path}) allow: drafters whose model or heads are missing are
    left out. ``dynamic`` adds each of ours again on the dynamic path, named "..., dynamic" (default: on a GPU,
    where the paths differ); ``compiled`` adds each with ``generate(compile=True)``, named "..., compiled";
    ``auto`` adds each drafter with ``speculation="auto"`` (the others draft every step), named "..., auto".
    ``max_length``: the static cache's columns (prompt and new tokens of the longest row)."""
    target = models.target
    if dynamic is None:
        dynamic = target.device.type == "cuda"
    found = [Strategy("generate", REFERENCE, _transformers(target)),
             Strategy("generate, static cache", BASELINE, _static_cache(target, max_length),
                      warms_every_batch=True)]
    found += _peers(models, peers or {}, draft_tokens, max_length)
    drafters = {NO_DRAFTER: None} | {f"specdec: {name}": drafter
                                     for name, drafter in models.drafters(draft_tokens, lookup_tokens).items()}
    for name, drafter in drafters.items():
        found.append(Strategy(name, OURS, _ours(target, drafter), warms_every_batch=True))
        if dynamic:
            found.append(Strategy(f"{name}, dynamic", OURS, _ours(target, drafter, fast_path=False)))
        if compiled:
            found.append(Strategy(f"{name}, compiled", OURS, _ours(target, drafter, compile=True),
                                  warms_every_batch=True))
        if auto and drafter is not None:
            found.append(Strategy(f"{name}, auto", OURS, _ours(target, drafter, speculation="auto"),
                                  warms_every_batch=True))
        if drafter is None:  # transformers' assisted generation after our loop's own cost
            if models.draft is not None:
                found.append(Strategy("assisted: draft model", ASSISTED,
                                      _transformers(target, assistant_model=models.draft), batch_one=True))
            found.append(Strategy("assisted: prompt lookup", ASSISTED,
                                  _transformers(target, prompt_lookup_num_tokens=lookup_tokens), batch_one=True))
    return found


def _transformers(target, **options):
    counted = bool(options)  # assisted generation: count its target passes

    def run(ids, mask, **kw):
        if not counted:
            return target.generate(ids, attention_mask=mask, **options, **kw), None
        with ForwardCounter(target) as counter:
            sequences = target.generate(ids, attention_mask=mask, **options, **kw)
        return sequences, {"forwards": counter.count, "drafted": 0, "accepted": 0}
    return run


def _static_cache(target, max_length: int):
    """``generate`` with one ``StaticCache`` per batch size, emptied before each call: transformers compiles the
    decode step on a GPU, and the same cache shape keeps that compiled step valid for every prompt length."""
    from transformers import StaticCache

    caches = {}
    keyword = cache_keyword(target)

    def run(ids, mask, **kw):
        cache = caches.get(ids.shape[0])
        if cache is None:
            cache = caches[ids.shape[0]] = StaticCache(config=target.config, max_cache_len=max_length)
        cache.reset()
        return target.generate(ids, attention_mask=mask, **{keyword: cache}, **kw), None
    return run


def _ours(target, drafter, **options):
    def run(ids, mask, **kw):
        res = generate(target, ids, attention_mask=mask, drafter=drafter, return_dict_in_generate=True,
                       **options, **kw)
        s = res.stats
        return res.sequences, {"forwards": s.target_forwards, "drafted": s.drafted_tokens,
                               "accepted": s.accepted_tokens, "row_steps": s.row_steps, "steps": s.steps,
                               "plain_steps": s.plain_steps}
    return run


def _mode_costs(target) -> dict[str, float] | None:
    """The milliseconds per step ``speculation="auto"`` measured for each mode (plain decoding, or the drafter's
    type and settings) in ``target``'s kept session; None where it measured none."""
    def label(drafted: tuple) -> str:
        if drafted == ("none",):
            return "plain"
        return drafted[0] if len(drafted) == 1 else f"{drafted[0].__name__}{drafted[2]}"
    costs = {label(recipe[0]): round(1e3 * cost, 4) for recipe, cost in measured_costs(target).items()}
    return costs or None


def _peers(models: Models, peers: dict, draft_tokens: int, max_length: int) -> list[Strategy]:
    """The peers' strategies; each converted model is checked against transformers' logits first."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"`peers` names {sorted(unknown)}; the peers known are {list(PEERS)} (gpt-fast=PATH).")
    if "gpt-fast" not in peers:
        return []
    from .gpt_fast import GptFast

    peer = GptFast(peers["gpt-fast"], models.target, models.draft, speculate_k=draft_tokens, max_length=max_length)
    probe = models.tokenizer(models.prompts(1), return_tensors="pt").input_ids
    peer.check(models.target, probe)

    def call(method, counted: bool):
        def run(ids, mask, *, max_new_tokens, do_sample=False, temperature=1.0, **_):
            sequences, c = method(ids, max_new_tokens, do_sample=do_sample, temperature=temperature)
            return sequences, {"forwards": c["target_forwards"], "drafted": c["drafted"],
                               "accepted": c["accepted"]} if counted else None
        return run

    found = [Strategy("gpt-fast: plain", BASELINE, call(peer.plain, False), warms_every_batch=True,
                      batch_one=True)]
    if models.draft is not None:
        found.append(Strategy("gpt-fast: speculative", PEER, call(peer.speculative, True), warms_every_batch=True,
                              batch_one=True))
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


def measure(models: Models, prompts: list[str], *, modes=("greedy", "sample"), batch_sizes=(1,),
            max_new_tokens: int = 128, calls: int = 4, repeats: int = 1, only: list[str] | None = None,
            seed: int = 0, progress: bool = True, after_cell=None, **options) -> dict:
    """Runs every strategy (or those named in ``only``, beside the baselines and our no-drafter path) in each mode at
    each batch size: batch b takes up to ``calls`` batches of b ragged, left-padded prompts, after one untimed
    warm-up call (ours, and those that compile, warm up on every batch); each batch's time is the median of
    ``repeats`` calls (on a CPU one call's time swings widely). Returns per-cell totals and completions;
    ``after_cell(results)`` sees the rows so far after each cell (a long run can save them). ``options`` go to
    ``strategies``."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"`modes` {sorted(unknown)} unknown; choose from {sorted(MODES)}.")
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > len(prompts):
        raise ValueError(f"`batch_sizes` {list(batch_sizes)} must be 1..{len(prompts)}, the number of prompts; "
                         "pass more prompts for larger batches.")
    tok, device = models.tokenizer, models.target.device
    batches = {b: _batches(tok, prompts, b, calls, device) for b in batch_sizes}
    widest = max(x["input_ids"].shape[1] for bs in batches.values() for x in bs)
    chosen = _choose(strategies(models, max_length=widest + max_new_tokens, **options), only)
    settings = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    stops = _stop_ids(models.target, tok)
    cells = [(b, mode, s) for b in batch_sizes for mode in modes for s in chosen if not (s.batch_one and b > 1)]
    results, texts, references = [], {}, {}
    for b, mode, strategy in tqdm(cells, disable=not progress, desc="bench"):
        row, outputs = _cell(models, strategy, batches[b], {**MODES[mode], **settings}, seed, stops, repeats)
        reference = references.setdefault((b, mode), outputs)
        greedy = mode == "greedy"
        results.append({"mode": mode, "batch": b, "strategy": strategy.name, "family": strategy.family, **row,
                        "same_text": _same(outputs, reference) if greedy else None,
                        "agreement": _agreement(outputs, reference) if greedy else None})
        texts[f"{mode}, batch {b}: {strategy.name}"] = [tok.decode(o, skip_special_tokens=True) for o in outputs]
        if after_cell is not None:
            _speedups(results)
            after_cell(results)
    _speedups(results)
    return {"results": results, "summary": summarize(results), "completions": texts}


def _choose(found: list[Strategy], only: list[str] | None) -> list[Strategy]:
    if only is None:
        return found
    missing = set(only) - {s.name for s in found}
    if missing:
        raise ValueError(f"`only` names {sorted(missing)}, which these models do not offer; "
                         f"they offer {[s.name for s in found]}.")
    return [s for s in found if s.name in only or s.name == NO_DRAFTER or s.family in NON_SPECULATIVE]


def _batches(tok, prompts: list[str], size: int, calls: int, device) -> list[dict]:
    """Up to ``calls`` batches of ``size`` prompts, left-padded, consecutive prompts together (ragged rows)."""
    count = max(1, min(calls, len(prompts) // size))
    return [tok(prompts[i * size:(i + 1) * size], return_tensors="pt", padding=True).to(device)
            for i in range(count)]


def _stop_ids(target, tok) -> set[int]:
    eos = target.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _new_tokens(sequences: torch.Tensor, width: int, stops: set[int], pad: int | None) -> list[list[int]]:
    """Each row's new tokens, up to and including its first eos, without the padding after a finished row."""
    rows = []
    for row in sequences[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), None)
        if end is not None:
            row = row[:end]
        while end is None and row and row[-1] == pad:
            row.pop()
        rows.append(row)
    return rows


def _same(outputs: list[list[int]], reference: list[list[int]]) -> bool:
    """Equal rows; a row longer than the reference's (gpt-fast runs past eos) is compared over its length."""
    return len(outputs) == len(reference) and all(o[:len(r)] == r for o, r in zip(outputs, reference))


def _agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """The share of the reference's tokens before each row first differs from it: in bf16, two correct
    implementations part at the first near-tie their different kernels round apart, and this says how late."""
    common = sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
                 for o, r in zip(outputs, reference))
    return round(common / max(sum(map(len, reference)), 1), 3)


def _cell(models: Models, strategy: Strategy, batches: list[dict], kwargs: dict, seed: int, stops,
          repeats: int = 1) -> tuple:
    """One strategy at one mode and batch size: warm-up, timed calls, then one profiled call."""
    target, device = models.target, models.target.device
    for model in (target, models.draft):
        if model is not None:
            release(model)  # what earlier strategies kept would count in this one's peak
    for x in batches if strategy.warms_every_batch else batches[:1]:
        torch.manual_seed(seed)
        strategy.run(x["input_ids"], x["attention_mask"], **kwargs)
    compiled_before = _graphs_compiled()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens, seconds, passes, row_passes, tau_tokens, drafted, accepted, rows, outputs = 0, 0.0, 0, 0, 0, 0, 0, 0, []
    steps = plain_steps = 0
    for n, x in enumerate(batches):
        times = []
        for _ in range(repeats):
            torch.manual_seed(seed + n)
            start = _sync(device)
            sequences, counts = strategy.run(x["input_ids"], x["attention_mask"], **kwargs)
            times.append(_sync(device) - start)
        seconds += statistics.median(times)
        new = _new_tokens(sequences, x["input_ids"].shape[1], stops, kwargs["pad_token_id"])
        outputs += new
        count = sum(map(len, new))
        tokens += count
        rows += len(new)
        if counts is not None:
            passes += counts["forwards"]
            # Ours counts the rows still generating at each step; a pass per row is the most others can say.
            row_passes += counts.get("row_steps", counts["forwards"] * len(new))
            tau_tokens += counts["accepted"] + counts["row_steps"] if "row_steps" in counts else count
            drafted += counts["drafted"]
            accepted += counts["accepted"]
            steps += counts.get("steps", 0)
            plain_steps += counts.get("plain_steps", 0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    compiled_while_timed = _graphs_compiled() - compiled_before
    torch.manual_seed(seed)
    first = batches[0]
    busy = gpu_busy_seconds(lambda: strategy.run(first["input_ids"], first["attention_mask"], **kwargs), device)
    return {
        "rows": rows, "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 2),
        "target_forwards": passes or None, "tau": round(tau_tokens / row_passes, 3) if row_passes else 1.0,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "plain_share": round(plain_steps / steps, 3) if steps else None,
        "mode_ms_per_step": _mode_costs(target),  # as the session kept them after the timed calls
        "peak_gb": None if peak is None else round(peak, 2),
        "gpu_busy": None if busy is None else round(min(busy / (seconds / len(batches)), 1.0), 3),
        "compiled_while_timed": compiled_while_timed,
    }, outputs


def _speedups(results: list[dict]) -> None:
    """Adds, per mode and batch size, each row's ratio to the fastest non-speculative baseline and to our own
    no-drafter path (the one with the same suffix, ", compiled" say, where there is one)."""
    for key in dict.fromkeys((r["mode"], r["batch"]) for r in results):
        rows = [r for r in results if (r["mode"], r["batch"]) == key]
        fastest = max((r for r in rows if r["family"] in NON_SPECULATIVE), key=lambda r: r["tokens_per_s"])
        ours = {r["strategy"]: r for r in rows if r["strategy"].startswith(NO_DRAFTER)}
        for r in rows:
            suffix = r["strategy"].partition(",")[2] if r["family"] == OURS and "," in r["strategy"] else ""
            base = ours.get(NO_DRAFTER + ("," + suffix if suffix else "")) or ours.get(NO_DRAFTER)
            r["fastest_baseline"] = fastest["strategy"]
            r["x_fastest_baseline"] = round(r["tokens_per_s"] / fastest["tokens_per_s"], 3)
            r["x_no_drafter"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None


def summarize(results: list[dict]) -> dict:
    """Per mode and batch size: our fastest speculative strategy, against the fastest non-speculative baseline
    and against our no-drafter path; and the fastest strategy of all."""
    summary = {}
    for mode, batch in dict.fromkeys((r["mode"], r["batch"]) for r in results):
        rows = [r for r in results if (r["mode"], r["batch"]) == (mode, batch)]
        best = max(rows, key=lambda r: r["tokens_per_s"])
        ours = max((r for r in rows if r["family"] == OURS and not r["strategy"].startswith(NO_DRAFTER)),
                   key=lambda r: r["tokens_per_s"], default=None)
        entry = {"fastest": best["strategy"], "fastest_baseline": rows[0]["fastest_baseline"]}
        if ours:
            entry.update(best_ours=ours["strategy"], tokens_per_s=ours["tokens_per_s"],
                         x_fastest_baseline=ours["x_fastest_baseline"], x_no_drafter=ours["x_no_drafter"])
        summary[f"{mode}, batch {batch}"] = entry
    return summary


def table(results: list[dict]) -> str:
    """A Markdown table of ``measure``'s results, ready for the docs."""
    lines = ["| mode | batch | strategy | tokens/s | τ | acceptance | × fastest baseline | × our no-drafter | "
             "same text | peak GiB | GPU busy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        parted = "" if r.get("agreement") is None else f" ({100 * r['agreement']:.0f}%)"
        same = "" if r["same_text"] is None else "yes" if r["same_text"] else f"no{parted}"
        busy = "" if r.get("gpu_busy") is None else f"{100 * r['gpu_busy']:.0f}%"
        peak = "" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}"
        x_ours = "" if r.get("x_no_drafter") is None else f"{r['x_no_drafter']:.2f}x"
        compiling = "†" if r.get("compiled_while_timed") else ""
        lines.append(f"| {r['mode']} | {r['batch']} | {r['strategy']} | {r['tokens_per_s']:.1f}{compiling} | "
                     f"{r['tau']:.2f} | {acc} | {r['x_fastest_baseline']:.2f}x | {x_ours} | {same} | {peak} | {busy} |")
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
