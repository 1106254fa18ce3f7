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
from .forward import Prefix, forward_tree, prefill
from .tree import Tree

PARENTS = (-1, 0, 0, 1)  # the probe's tree: a root after the prompt, two children, a grandchild under the first
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
    tree = Tree(tokens=tokens[:, PROMPT:], parents=torch.tensor(PARENTS, device=device).expand(2, -1),
                valid=torch.ones_like(tokens[:, PROMPT:], dtype=torch.bool))
    expected = _plain(model, tokens[:, :PROMPT], start, tree)
    tolerance = TOLERANCE.get(model.dtype, LOW_PRECISION_TOLERANCE)
    for gap in (0, GAP):
        got = _ours(model, tokens[:, :PROMPT], start, tree, gap)
        error = ((got - expected).abs().amax() / expected.abs().amax().clamp_min(1e-6)).item()
        if not error <= tolerance:
            where = "right after the prompt" if gap == 0 else f"{gap} columns past the prompt (a held cache)"
            return (f"with a tree written {where}, its logits differ from its own forward's by {error:.2g} of "
                    f"their largest (tolerance {tolerance:g}): its code keeps state outside the cache it is "
                    f"given, or places keys by cache column rather than by position.")
    return None


def _plain(model, prompt: torch.Tensor, start: torch.Tensor, tree: Tree) -> torch.Tensor:
    """(B, 1 + N, V): the model's own logits, with no cache and no padding, after each row's prompt and after
    each tree node's path (its ancestors, in index order, then itself)."""
    rows = []
    for b in range(prompt.shape[0]):
        sequences = [prompt[b, int(start[b]):]] + [torch.cat([prompt[b, int(start[b]):], tree.tokens[b][path]])
                                                     for path in tree.ancestors[b]]
        rows.append(torch.stack([model(input_ids=ids[None], use_cache=False).logits[0, -1] for ids in sequences]))
    return torch.stack(rows).float()


def _ours(model, prompt: torch.Tensor, start: torch.Tensor, tree: Tree, gap: int) -> torch.Tensor:
    """(B, 1 + N, V): the same logits through :func:`~specdec.forward.prefill` and the verifier's tree pass
    (:func:`~specdec.forward.forward_tree`), ``gap`` columns past the prompt."""
    cache = TreeCache(capacity=PROMPT + gap + len(PARENTS))
    _, last = prefill(model, cache, prompt, start)
    if gap:
        cache.hold(PROMPT + gap)
    logits = forward_tree(model, cache, tree, Prefix(start, torch.full_like(start, PROMPT)))
    return torch.cat([last[:, None], logits], dim=1).float()
