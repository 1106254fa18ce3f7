"""``generate``: the speculative decoding loop, a drop-in for ``model.generate``.

Per step: the drafter proposes a tree rooted at each row's last token, the target runs once over the
tree, the verifier accepts a path per row, the cache keeps that path, and the new tokens stream out.
Everything the caller passes is validated before any model runs; the caller's model, generation config
and cache are never modified.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from transformers.cache_utils import DynamicCache

from . import features, guard
from . import session as sessions
from .adaptive import DeviceClock, Speculation
from .drafters.base import Drafter, require_positive
from .drafters.draft_model import DraftModel
from .drafters.prompt_lookup import PromptLookup
from .forward import check_model, prefill
from .graphs import StepGraphs
from .output import SpeculativeOutput, Stats
from .sampling import Sampling
from .sequences import Sequences
from .step import (COUNTER_SIZE, COUNTERS, allow_recompiles, compile_static, compiled_keep_accepted, keep_accepted,
                   verify_step)
from .tree import Tree
from .verify import verify


def _resolve_drafter(drafter, assistant_model, prompt_lookup_num_tokens) -> Drafter | None:
    given = [n for n, v in [("drafter", drafter), ("assistant_model", assistant_model),
                            ("prompt_lookup_num_tokens", prompt_lookup_num_tokens)] if v is not None]
    if len(given) > 1:
        raise ValueError(f"Pass at most one of `drafter`, `assistant_model`, `prompt_lookup_num_tokens`; got {given}.")
    if assistant_model is not None:
        return DraftModel(assistant_model)
    if prompt_lookup_num_tokens is not None:
        require_positive(prompt_lookup_num_tokens=prompt_lookup_num_tokens)
        return PromptLookup(num_draft_tokens=prompt_lookup_num_tokens)
    if drafter is not None and not isinstance(drafter, Drafter):
        hint = (" For a draft model, pass specdec.DraftModel(model) or assistant_model=model."
                if isinstance(drafter, torch.nn.Module) else
                " For saved heads, pass specdec.heads.load(path, model)." if isinstance(drafter, (str, os.PathLike))
                else "")
        raise TypeError(f"`drafter` must be a specdec Drafter (DraftModel, PromptLookup, ...), got "
                        f"{type(drafter).__name__}.{hint}")
    return drafter


def _check_ids(input_ids) -> torch.Tensor:
    """Token ids of any integer type, as transformers takes them, as int64."""
    integer = isinstance(input_ids, torch.Tensor) and not (input_ids.dtype.is_floating_point
                                                          or input_ids.dtype.is_complex or input_ids.dtype == torch.bool)
    if not integer or input_ids.dim() != 2:
        raise ValueError("`input_ids` must be an integer tensor of shape (batch, prompt_length), "
                         f"got {type(input_ids).__name__} {getattr(input_ids, 'dtype', '')} {tuple(getattr(input_ids, 'shape', ()))}.")
    if input_ids.shape[1] == 0:
        raise ValueError("`input_ids` is empty: each row needs at least one token.")
    return input_ids.long()


def _check_lengths_and_eos(model, sampling: Sampling, width: int, max_new: int) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    outside = [e for e in sampling.eos_token_ids if not 0 <= e < vocab]
    if outside:
        raise ValueError(f"`eos_token_id` {outside} is outside the model's vocabulary (0..{vocab - 1}); pass the "
                         "tokenizer's eos_token_id.")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and width + max_new > limit:
        warnings.warn(f"The prompt ({width} tokens) and max_new_tokens={max_new} go past the model's "
                      f"max_position_embeddings={limit}: positions beyond it were never trained, and the output "
                      "may degrade, as with transformers' generate.", UserWarning, stacklevel=3)


def _resolve_config(model, generation_config, kwargs, width: int):
    """transformers' own resolution (kwargs > generation_config > model's > defaults), and its length rule:
    with no length given anywhere, 20 new tokens, capped by the model's maximum position."""
    default_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    resolved = model._prepare_generation_config(generation_config, **kwargs)
    config, unused = resolved if isinstance(resolved, tuple) else (resolved, {})
    unused = {k: v for k, v in unused.items() if v is not None}
    if unused:
        raise TypeError(f"generate() got unsupported keyword arguments {sorted(unused)}.")
    for name in ("max_new_tokens", "max_length"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
        if max_new <= 0:
            raise ValueError(f"`max_new_tokens` must be positive, got {max_new}.")
    elif default_length:
        limit = getattr(model.config, "max_position_embeddings", None) or float("inf")
        max_new = min(config.max_length + width, limit) - width
        if max_new <= 0:
            raise ValueError(f"The prompt's {width} tokens fill max_position_embeddings={limit}; pass max_new_tokens.")
    else:
        max_new = config.max_length - width
        if max_new <= 0:
            raise ValueError(f"`max_length` {config.max_length} leaves no room after the prompt's {width} tokens; "
                             "pass a larger max_length, or max_new_tokens.")
    return config, int(max_new)


def _resolve_mask(input_ids, attention_mask, pad_token_id, eos):
    if attention_mask is None:
        if pad_token_id is not None and pad_token_id not in eos and bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}, `input_ids` {tuple(input_ids.shape)}.")
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()) or bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "`attention_mask` must be left-padded (zeros, then ones, with at least one token per row); "
            "set tokenizer.padding_side = 'left'."
        )
    return mask


def _check_cache(past_key_values, input_ids) -> None:
    if type(past_key_values) is not DynamicCache or any(layer.is_sliding for layer in past_key_values.layers):
        raise TypeError(
            f"`past_key_values` of type {type(past_key_values).__name__} is not supported; pass None or a "
            f"DynamicCache without sliding-window layers holding a prefix of `input_ids`."
        )
    cached = past_key_values.get_seq_length()
    batch = [layer.keys.shape[0] for layer in past_key_values.layers if layer.is_initialized and layer.keys.numel()]
    if cached >= input_ids.shape[1] or any(b != input_ids.shape[0] for b in batch):
        raise ValueError(
            f"`past_key_values` holds {cached} tokens for batch {batch[:1]}; it must cover a strict prefix "
            f"of `input_ids` {tuple(input_ids.shape)}."
        )


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _AllFinished:
    """Whether every row has finished, copied to the host after each step without waiting for it."""

    def __init__(self, seqs: Sequences):
        self.seqs = seqs
        self.cuda = seqs.end.device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.copied: list = []  # CUDA events after the copies not read yet, oldest first

    def copy(self) -> None:
        self.host.copy_(self.seqs.finished.all(), non_blocking=True)
        if self.cuda:
            self.copied.append(torch.cuda.Event())
            self.copied[-1].record()

    def read(self, late: bool) -> bool:
        """The newest copy, or on a GPU with ``late`` the one before it (False before there is one), waiting
        for that copy alone. A newer value may already have arrived; it is as good, since ``finished`` only
        grows."""
        if self.cuda:
            if late and len(self.copied) < 2:
                return False
            self.copied[-2 if late else -1].synchronize()
            del self.copied[:-1]
        return bool(self.host)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    drafter: Drafter | None = None,
    assistant_model=None,
    prompt_lookup_num_tokens: int | None = None,
    generation_config=None,
    streamer=None,
    past_key_values=None,
    cache=None,
    fast_path: bool | None = None,
    compile: bool = False,
    fuse_projections: bool = True,
    speculation: str = "always",
    **kwargs,
):
    """Generate as ``model.generate`` would, verifying drafted tokens in one target pass per step.

    Greedy output equals ``model.generate(do_sample=False)`` token for token; sampled output follows the
    target's distribution exactly. Returns a LongTensor, or with ``return_dict_in_generate=True`` a
    :class:`~specdec.output.SpeculativeOutput` whose ``.stats`` count forwards, drafts and acceptance.

    ``fast_path``: None (default) captures each verification step as a CUDA graph on a GPU and replays it,
    and runs the dynamic path on a CPU; True runs the fixed-shape step everywhere (without graphs on a
    CPU, where it checks that path); False always runs the dynamic path. A model whose step cannot be
    captured falls back to the dynamic path, with a warning said once. On the fixed-shape step ``generate``
    keeps the model's buffers and captured steps between calls (:mod:`specdec.session`, as transformers keeps
    a static cache), so a later call that fits replays the steps an earlier one captured;
    ``specdec.release(model)`` frees them.

    ``compile=True`` also fuses the target's forward in that step with ``torch.compile`` (Inductor): the
    norms, rotary embeddings and activations that eager modeling code runs as dozens of small kernels per
    layer, the acceptance after it, and the drafter's own passes (a draft model, Medusa heads, EAGLE's
    decoder). It raises Dynamo's per-frame recompile limit to 64 for the process. The first call compiles
    (seconds for small models, minutes for large ones); later calls that fit the kept buffers reuse it whatever
    their prompt's length, and one that needs larger buffers, or another batch size, compiles once more: every
    graph is static, which a CUDA graph can capture. It implies the fixed-shape step, on a CPU too.

    ``fuse_projections`` (default True) runs each layer's q/k/v projections, and its gate/up projections, as
    one GEMM during the call (:mod:`specdec.fusion`): the first call moves each group's weights into one
    buffer, without copying the model or changing its parameters' names or values.

    ``speculation``: "always" (default) drafts every step with the drafter as given. "auto" chooses, as the call
    runs, between the drafter as given, plain decoding and the drafter's smaller trees, by the tokens per second
    it predicts for each from their measured cost per step and the drafter's measured acceptance, kept in the
    session for later calls (:mod:`specdec.adaptive`); seeded sampling then follows the timing. Either way the
    output is the target's. "auto" is not the default yet: on an H200 the design before this one ran below plain
    decoding where it chose plain decoding, and below "always" at batch 1; this one is not measured
    (docs/benchmarks.md).
    """
    call = _resolve(model, input_ids, attention_mask, drafter, assistant_model, prompt_lookup_num_tokens,
                    generation_config, streamer, past_key_values if cache is None else cache,
                    (fast_path, compile, fuse_projections, speculation), kwargs,
                    both_caches=cache is not None and past_key_values is not None)
    return _run(call)


@dataclass
class _Call:
    """One call's inputs and mode, resolved and checked before anything runs."""

    model: object
    input_ids: torch.Tensor  # (B, W)
    mask: torch.Tensor  # (B, W) bool, left-padded
    config: object  # the resolved GenerationConfig
    sampling: Sampling
    max_new: int
    drafter: Drafter | None
    streamer: object
    past_key_values: object
    fast_path: bool | None
    compile: bool
    fuse_projections: bool
    speculation: str

    @property
    def want_features(self) -> bool:
        return self.drafter is not None and self.drafter.wants_features

    @property
    def graphs_on(self) -> bool:
        return self.fast_path is not False and self.input_ids.device.type == "cuda"

    @property
    def fixed(self) -> bool:
        """The cache held at a fixed length: the fixed-shape step."""
        return bool(self.fast_path or self.compile or self.graphs_on)

    def recipe(self, drafter: Drafter | None) -> tuple | None:
        """What a step drafted by ``drafter`` (None: nothing drafted) depends on besides the session's buffers
        and the tree's shape, when captured; None: nothing captured is kept past this call (a drafter without
        ``settings``)."""
        if drafter is None:
            drafted = ("none",)
        elif not drafter.drafts_in_step:
            drafted = ("input",)
        elif (settings := drafter.settings()) is None:
            return None
        else:
            drafted = (type(drafter), drafter.kept, settings)
        return drafted, self.sampling, self.compile, self.want_features


def _resolve(model, input_ids, attention_mask, drafter, assistant_model, prompt_lookup_num_tokens,
             generation_config, streamer, past_key_values, flags: tuple, kwargs, both_caches: bool) -> _Call:
    model = check_model(model, "model")
    if both_caches:  # `cache` is transformers 5.40's name for past_key_values
        raise ValueError("Pass the prompt's cache as `cache` or as `past_key_values`, not both.")
    drafter = _resolve_drafter(drafter, assistant_model, prompt_lookup_num_tokens)
    input_ids = _check_ids(input_ids)
    _check_flags(*flags)
    batch, width = input_ids.shape
    config, max_new = _resolve_config(model, generation_config, kwargs, width)
    sampling = Sampling.from_config(config)
    _check_lengths_and_eos(model, sampling, width, max_new)
    pad = config.pad_token_id
    if batch > 1 and pad is None:
        raise ValueError("Batch size > 1 needs a pad token: pass `pad_token_id=` or set tokenizer.pad_token.")
    if streamer is not None and batch > 1:
        raise ValueError("`streamer` supports batch size 1 only.")
    mask = _resolve_mask(input_ids, attention_mask, pad, sampling.eos_token_ids)
    if drafter is not None:
        drafter.check(model)
    if drafter is not None and drafter.wants_features and past_key_values is not None:
        raise ValueError(
            f"{type(drafter).__name__} drafts from the target's features of the whole prompt, which a "
            f"prefilled `past_key_values` skips; pass the prompt without `past_key_values`."
        )
    if past_key_values is not None:
        _check_cache(past_key_values, input_ids)
    guard.prove(model, "model")
    return _Call(model, input_ids, mask, config, sampling, max_new, drafter, streamer, past_key_values, *flags)


def _check_flags(fast_path, compile, fuse_projections, speculation) -> None:
    if fast_path not in (None, True, False):
        raise ValueError(f"`fast_path` must be None, True or False, got {fast_path!r}.")
    if compile not in (True, False):
        raise ValueError(f"`compile` must be True or False, got {compile!r}.")
    if fuse_projections not in (True, False):
        raise ValueError(f"`fuse_projections` must be True or False, got {fuse_projections!r}.")
    if speculation not in ("auto", "always"):
        raise ValueError(f"`speculation` must be 'auto' or 'always', got {speculation!r}.")
    if compile and fast_path is False:
        raise ValueError("`compile=True` compiles the fixed-shape step, which `fast_path=False` refuses; "
                         "drop one of them.")


def _run(call: _Call):
    """The call's session, the prompt's pass, then verification steps until every row has finished."""
    model, stats = call.model, Stats()
    session = sessions.open_session(model, call.input_ids, call.mask, call.max_new, COUNTER_SIZE, call.fixed,
                                    call.past_key_values, call.fuse_projections)
    with session:
        call.drafter = session.drafter(call.drafter)
        if call.drafter is not None:
            call.drafter.compile = call.compile
        try:
            first = _prefill(call, session, stats)
            modes, last = _decode(call, session, stats, first)
        finally:
            if call.drafter is not None:
                call.drafter.end()
    for name, value in zip(COUNTERS, session.counters.tolist()):
        setattr(stats, name, value)
    stats.target_forwards += stats.steps
    _count_modes(modes, last, stats)
    return _output(call, session.seqs, stats)


def _prefill(call: _Call, session, stats: Stats) -> torch.Tensor:
    """The prompt's pass, which already gives the first token as in plain decoding: the bonus token of a tree
    with nothing drafted, from which trees grow. Returns it, (B,)."""
    model, seqs, cache, sampling = call.model, session.seqs, session.cache, call.sampling
    with features.capture(model, call.want_features) as captured:
        passes, last = prefill(model, cache, call.input_ids, seqs.start, begin=cache.get_seq_length())
    stats.target_forwards += passes
    if captured:
        seqs.write_prompt_features(torch.cat(captured, 1))
    first = verify(Tree.root_only(seqs.last), last[:, None], sampling, seqs.generated[:, None],
                   seqs.end[:, None]).tokens[:, 0]
    seqs.append(first[:, None], torch.ones_like(first))
    seqs.finished |= (seqs.end >= seqs.stop) | sampling.is_eos(first)
    session.counters[COUNTERS.index("new_tokens")] += first.shape[0]
    if call.fixed:  # rows' cached columns end before the limit
        cache.hold(seqs.limit)
    if call.drafter is not None:
        call.drafter.begin(model, seqs, sampling)
    return first


@dataclass
class _Mode:
    """One way ``_decode`` runs a step: a shape of the drafter, or plain decoding (``drafter`` None), with the
    graphs kept for it (under ``key``, its recipe), the step a graph captures, and how many steps it ran in
    this call."""

    drafter: Drafter | None
    graphs: StepGraphs
    key: Hashable
    step: Callable  # (tree or None) -> (tokens, count): the verification step, drafting with ``drafter``
    ran: int = 0
    # The graph key of a step that drafts its own tree (``Drafter.drafts_in_step``, or nothing drafted); None
    # where the drafter proposes on the host, and the tree's shape keys the graph. Set once: the loop reads it
    # every step.
    in_step: tuple | None = field(init=False)

    def __post_init__(self):
        drafter = self.drafter
        self.in_step = (("drafted", 1 if drafter is None else drafter.fixed_nodes)
                        if drafter is None or drafter.drafts_in_step else None)


def _modes(call: _Call, session, step: Callable) -> list[_Mode]:
    """The drafter as given; under ``speculation="auto"`` then plain decoding and the drafter's smaller shapes,
    each running ``step(drafter, tree)``. A step that cannot be captured turns graphs off for every mode, and
    lets go of the fixed shapes unless the caller asked for them."""
    def fall_back() -> None:
        for mode in modes:
            mode.graphs.enabled = False
        if not call.fast_path:
            cache.hold(None)

    cache, drafter = session.cache, call.drafter
    drafters = [drafter] if drafter is None or call.speculation == "always" else [drafter, None, *drafter.shapes()[1:]]
    recipes = [call.recipe(d) for d in drafters]
    modes = [_Mode(d, StepGraphs(call.graphs_on, fall_back, session.graphs(r)), r, functools.partial(step, d))
             for d, r in zip(drafters, recipes)]
    return modes


def _chooser(session, modes: list[_Mode]) -> Speculation | None:
    """``speculation="auto"``'s choice of mode, with what the session keeps when every mode's recipe is kept."""
    if len(modes) == 1:
        return None
    kept = all(mode.key is not None for mode in modes)
    depths = [None] + [0 if mode.drafter is None else mode.drafter.max_depth for mode in modes[1:]]
    return Speculation([mode.key for mode in modes] if kept else list(range(len(modes))), depths,
                       session.speculation if kept else {}, DeviceClock(session.counters[len(COUNTERS):]))


def _decode(call: _Call, session, stats: Stats, first: torch.Tensor) -> tuple[list[_Mode], _Mode | None]:
    """Verification steps, replayed from the session's graphs where they can be, until every row finished.
    Returns the modes and the one that ran last."""
    model, seqs, cache, streamer = call.model, session.seqs, session.cache, call.streamer
    # Compiled only where shapes are fixed: a held cache (a failed capture lets go of it).
    if call.compile:
        allow_recompiles()
    fused = (compile_static(model), compiled_keep_accepted()) if call.compile else (model, keep_accepted)

    def step(drafter: Drafter | None, tree: Tree | None):
        target, keep = fused if cache.held is not None else (model, keep_accepted)
        tree = tree if tree is not None else drafter.propose(seqs) if drafter is not None else Tree.root_only(seqs.last)
        return verify_step(target, cache, seqs, tree, call.sampling, session.counters, call.want_features, keep)

    modes = _modes(call, session, step)
    chooser, mode = _chooser(session, modes), None
    if streamer is not None:
        streamer.put(call.input_ids.cpu())
        streamer.put(first.cpu())
    all_finished = _AllFinished(seqs)
    done = bool(seqs.finished.all())
    while not done:
        sizes = session.sizes()
        mode = _enter(modes[chooser.current if chooser else 0], mode, seqs, sizes)
        t0 = time.perf_counter()
        tree = None if mode.in_step is not None else mode.drafter.propose(seqs)
        t1 = t0 if tree is None else _sync(seqs.end.device)
        key = (mode.in_step if tree is None else tree.shape, sizes)
        tokens, count = mode.graphs.run(mode.step, key, tree)
        mode.ran += 1
        all_finished.copy()
        if streamer is not None:
            streamer.put(tokens[0, : int(count[0])].cpu())
        # A step that reads nothing (the cache held) lets the host read "all finished" one step late, so it
        # queues step k + 1 while the GPU runs step k instead of idling until it ends: at most one step
        # runs past the end, every row masked out (it changes nothing, and the device's counters skip it).
        done = all_finished.read(late=cache.held is not None and streamer is None)
        if chooser is not None and not done:
            chooser.stepped()
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += time.perf_counter() - t1
    if chooser is not None:
        chooser.finish()
    if streamer is not None:
        streamer.end()
    return modes, mode


def _enter(mode: _Mode, previous: _Mode | None, seqs: Sequences, sizes: tuple) -> _Mode:
    """``mode`` for the next step: a drafter that did not draft the step before catches up first, in passes
    replayed from the mode's graphs (the same pass each time; eager, each pass would launch the drafter's
    kernels one by one from Python)."""
    if previous is not None and mode is not previous and mode.drafter is not None:
        mode.drafter.resync(seqs, lambda one_pass: mode.graphs.run(lambda _: one_pass(), ("resync", sizes)))
    return mode


def _count_modes(modes: list[_Mode], last: _Mode | None, stats: Stats) -> None:
    """Steps and draft passes per mode into ``stats``. The host may have queued one step past the end (in the
    last mode), which the device's counters skip."""
    if last is not None:
        last.ran -= sum(mode.ran for mode in modes) - stats.steps
    stats.plain_steps = sum(mode.ran for mode in modes if mode.drafter is None)
    stats.draft_forwards = sum(mode.drafter.forwards + mode.drafter.forwards_per_step * mode.ran
                               for mode in modes if mode.drafter is not None)


def _output(call: _Call, seqs: Sequences, stats: Stats):
    """``generate``'s return: the sequences, padded after each row's end, and with the stats if asked."""
    width, pad = call.input_ids.shape[1], call.config.pad_token_id
    out_width = int(seqs.end.max())
    sequences = seqs.tokens[:, :out_width].clone()
    sequences[:, :width] = call.input_ids
    if pad is not None:
        beyond = torch.arange(out_width, device=seqs.end.device)[None, :] >= seqs.end[:, None]
        sequences[beyond] = pad
    if call.config.return_dict_in_generate:
        return SpeculativeOutput(sequences=sequences, stats=stats)
    return sequences


class SpeculativeModel:
    """``wrap(model, drafter)``: behaves as ``model``, but its ``generate`` speculates."""

    def __init__(self, model, drafter: Drafter | None = None):
        checked = check_model(model, "model")
        drafter = _resolve_drafter(drafter, None, None)
        if drafter is not None:
            drafter.check(checked)
        self.model = model
        self.drafter = drafter

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs.setdefault("drafter", None if {"assistant_model", "prompt_lookup_num_tokens"} & kwargs.keys() else self.drafter)
        return generate(self.model, input_ids, attention_mask, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def wrap(model, drafter: Drafter | None = None) -> SpeculativeModel:
    return SpeculativeModel(model, drafter)
