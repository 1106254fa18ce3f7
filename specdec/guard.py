"""Proof, before a model's first speculative step, that our tree pass gives the model's own logits.

Supporting "any causal LM" through transformers' extension points rests on each model's code honouring them:
keeping its state in the ``Cache`` it is given, taking positions from ``position_ids`` and masks from the
4D mask or the attention interface. A model that does not (state of its own, biases by cache column, a
forward that drops the cache under another name) would still run, and return different text. So the first
call on each model class and configuration runs a probe: two ragged rows prefilled through a
:class:`~specdec.cache.TreeCache`, then a branching tree of four nodes, once right after the prompt (the
dynamic path) and once at columns past a gap (the fixed-shape path holds the cache there), each node's
logits compared with a plain forward over the node's own prefix. A mismatch or an exception refuses the
model, naming it, before anything is generated. The verdict is kept per class, configuration, dtype,
device type and attention backend for the life of the process: it does not see the weights, so a fault that
shows only with some weights (a tie in a top-k choice of keys) can pass it; such models are refused by rule in
:func:`specdec.forward.check_model`.
"""

from __future__ import annotations

import threading

import torch

from . import attention
from .cache import TreeCache
from .forward import Prefix, forward_nodes, prefill

# Tree of the probe: parent of each node (-1: the root, which follows the prompt) and its depth.
PARENTS = (-1, 0, 0, 1)
DEPTHS = (0, 1, 1, 2)
PROMPT = 6  # columns of the probe's prompt; the second row is left-padded by PAD
PAD = 2
GAP = 3  # columns between the prompt and the tree in the held probe
# Largest max |ours - theirs| / max |theirs| taken as rounding, by the model's precision.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
LOW_PRECISION_TOLERANCE = 5e-2

_verdicts: dict[tuple, str | None] = {}
_lock = threading.Lock()


def prove(model, argument: str) -> None:
    """Refuse ``model`` (a checked transformers causal LM) unless its logits through our cache and tree masks
    equal its own, to rounding; the probe runs once per kind of model (see the module's docstring)."""
    key = _key(model)
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _probe(model)
    reason = _verdicts[key]
    if reason is not None:
        raise NotImplementedError(
            f"`{argument}` ({type(model).__name__}) cannot be verified exactly: {reason} Speculative decoding "
            f"would change its output, so specdec refuses it; use its own `generate`."
        )


def _key(model) -> tuple:
    config = model.config
    return (type(model), config.to_json_string(use_diff=False), config._attn_implementation, model.dtype,
            model.device.type, attention._backend.get())


def _probe(model) -> str | None:
    """None if the model passes, else why not (a sentence)."""
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return _compare(model)
    except Exception as error:  # the model's own code failed on what our engine feeds it
        return f"its forward raised {type(error).__name__} ({_first_line(error)}) on a tree through our cache."
    finally:
        for module, training in was_training.items():
            module.training = training


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no message"


def _compare(model) -> str | None:
    device = model.device
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(min(vocab, 1000), (2, PROMPT + len(PARENTS)), generator=generator).to(device)
    start = torch.tensor([0, PAD], device=device)
    expected = _plain(model, tokens, start)
    for gap in (0, GAP):
        got = _ours(model, tokens, start, gap)
        error = ((got - expected).abs().amax() / expected.abs().amax().clamp_min(1e-6)).item()
        tolerance = TOLERANCE.get(model.dtype, LOW_PRECISION_TOLERANCE)
        if not error <= tolerance:
            where = "right after the prompt" if gap == 0 else f"{gap} columns past the prompt (a held cache)"
            return (f"with a tree written {where}, its logits differ from its own forward's by {error:.2g} of "
                    f"their largest (tolerance {tolerance:g}): its code keeps state outside the cache it is "
                    f"given, or places keys by cache column rather than by position.")
    return None


def _paths() -> list[list[int]]:
    """The probe's columns on each tree node's path, prompt excluded, the node last."""
    paths = []
    for node, parent in enumerate(PARENTS):
        paths.append((paths[parent] if parent >= 0 else []) + [PROMPT + node])
    return paths


def _plain(model, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(B, 1 + nodes, V): the model's own logits, with no cache and no padding, after each row's prompt and
    after each node's path."""
    rows = []
    for b in range(tokens.shape[0]):
        prompt = tokens[b, int(start[b]) : PROMPT].tolist()
        found = [model(input_ids=torch.tensor([prompt], device=tokens.device), use_cache=False).logits[0, -1]]
        for path in _paths():
            ids = prompt + tokens[b, path].tolist()
            found.append(model(input_ids=torch.tensor([ids], device=tokens.device), use_cache=False).logits[0, -1])
        rows.append(torch.stack(found))
    return torch.stack(rows).float()


def _ours(model, tokens: torch.Tensor, start: torch.Tensor, gap: int) -> torch.Tensor:
    """(B, 1 + nodes, V): the same logits through :func:`~specdec.forward.prefill` and a tree pass of
    :func:`~specdec.forward.forward_nodes`, ``gap`` columns past the prompt."""
    cache = TreeCache(capacity=PROMPT + gap + len(PARENTS))
    _, last = prefill(model, cache, tokens[:, :PROMPT], start)
    if gap:
        cache.hold(PROMPT + gap)
    nodes = len(PARENTS)
    visible = torch.zeros(nodes, nodes, dtype=torch.bool, device=tokens.device)
    for node, path in enumerate(_paths()):
        visible[node, [column - PROMPT for column in path]] = True
    depth = torch.tensor(DEPTHS, device=tokens.device)
    positions = (PROMPT - start)[:, None] + depth[None, :]
    batch = tokens.shape[0]
    logits = forward_nodes(model, cache, tokens[:, PROMPT:], positions,
                           Prefix(start, torch.full_like(start, PROMPT)), visible.expand(batch, -1, -1), positions)
    return torch.cat([last[:, None], logits], dim=1).float()
