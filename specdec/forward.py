"""One forward pass of any causal LM over new nodes that attend to a cached prefix and to their ancestors.

This is the seam where the verifier's attention happens. It plugs into the model's own code through
transformers' extension points only: a custom :class:`~specdec.cache.TreeCache`, explicit per-node
``position_ids`` (root position + depth), and either the Triton tree kernel registered as an attention
function (see :mod:`specdec.attention`; on CUDA) or 4D float masks (0 / finfo.min), which transformers'
mask creation passes through unchanged to eager and SDPA attention. Models with several layer types
(Gemma2, Qwen2 with sliding layers) receive one mask per type, as their own forward builds them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from . import attention
from .tree import Tree

SUPPORTED_ATTENTION = ("eager", "sdpa")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "moe")  # "moe": an MLP-only layer (Nemotron-H)
# What the layer kinds transformers names are, for a refusal: a state a rejected draft cannot be rolled back
# out of, or keys a tree cannot be masked through.
LAYER_KINDS = {
    "linear_attention": "linear-attention or state-space layers (a recurrent state, updated in place)",
    "mamba": "Mamba state-space layers (a recurrent state, updated in place)",
    "conv": "short-convolution layers (a rolling convolution state)",
    "hybrid": "hybrid layers (attention beside a recurrent branch)",
    "hybrid_sliding": "hybrid sliding-window layers (attention beside a recurrent branch)",
    "chunked_attention": "chunked-attention layers (each token sees only its chunk, by cache column)",
    "indexed_attention": "indexed sparse-attention layers (a learned indexer picks each token's keys)",
    "compressed_sparse_attention": "compressed sparse-attention layers (keys pooled into blocks as they arrive)",
    "heavily_compressed_attention": "compressed attention layers (keys pooled into blocks as they arrive)",
}


def cache_keyword(model) -> str:
    """The name ``model``'s forward takes its cache under: transformers 5.40 drops ``past_key_values`` for
    ``cache`` (from 5.2x both work, the old one with a warning); earlier versions know only the old one."""
    return "cache" if "cache" in _forward_parameters(type(getattr(model, "_orig_mod", model))) else "past_key_values"


@functools.cache
def _forward_parameters(model_class) -> frozenset[str]:
    """The names ``model_class.forward`` takes, once per class: forward_nodes asks on every pass (a compiled
    model is asked about the module it wraps)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def layer_windows(config) -> dict[str, int | None] | int | None:
    """The sliding window of each mask the model expects: a dict for models that take one mask per layer
    type, else the single window (None for full attention)."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is None:
        return window
    return {kind: (window if kind == "sliding_attention" else None) for kind in set(layer_types)}


def check_model(model, argument: str):
    """The transformers model to drive for ``model`` (a PEFT model's, its adapters injected in place: what its
    ``generate`` runs); refuse, before anything runs, one this engine cannot drive exactly."""
    from transformers import PreTrainedModel

    if type(model).__name__.startswith("PeftModel") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if (
        not isinstance(model, PreTrainedModel)
        or getattr(config, "is_encoder_decoder", False)
        or model.get_output_embeddings() is None
    ):
        raise TypeError(
            f"`{argument}` must be a decoder-only causal LM with an LM head (AutoModelForCausalLM), "
            f"got {type(model).__name__}."
        )
    impl = config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"`{argument}` uses attn_implementation={impl!r}, which cannot take a tree attention mask; "
            f"load it with attn_implementation='sdpa' or 'eager'."
        )
    reason = _unsupported(model)
    if reason is not None:
        raise NotImplementedError(f"`{argument}` ({type(model).__name__}) {reason}; use its own `generate`.")
    return model


def _unsupported(model) -> str | None:
    """Why this engine cannot drive ``model`` exactly, known from its class and config alone; None if nothing
    is known against it (``guard.prove`` then checks what it computes)."""
    config = model.config
    parameters = _forward_parameters(type(model))
    if "past_key_values" not in parameters and "cache" not in parameters:
        state = next((name for name in ("cache_params", "state", "past_buckets_states") if name in parameters), None)
        return "takes no KV cache" + (f": its state is `{state}`, which a rejected draft cannot be cropped out of"
                                      if state else "")
    kinds = sorted(set(getattr(config, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if kinds:
        found = "; ".join(LAYER_KINDS.get(kind, f"`{kind}` layers, a kind specdec does not know") for kind in kinds)
        return f"has {found}: speculative decoding verifies full and sliding-window attention layers only"
    if config.model_type == "bloom" or getattr(config, "alibi", False) or getattr(
            getattr(config, "attn_config", None), "alibi", False):
        return ("adds ALiBi biases, which its code takes from cache columns and a 2D mask rather than from each "
                "token's position: tree nodes and left-padded rows would get other biases")
    if getattr(config, "keep_window_size", None):
        return ("keeps only the top-scoring keys of each query (`keep_window_size`), chosen over cache columns that a "
                "tree's other branches and padding also occupy, so the choice can differ from its own pass")
    if "local" in (getattr(config, "attention_layers", None) or ()):
        return ("has local-attention layers whose window its code applies by cache column, which tree nodes and "
                "left-padded rows do not follow")
    try:
        attention.head_dim(config)
    except AttributeError:
        return ("gives no attention sizes in its own config (`head_dim`, or `hidden_size` and "
                "`num_attention_heads`), which the verifier's masks and kernel are sized by")
    for name, what in (("attention_mask", "a tree's mask"), ("position_ids", "tree nodes' positions")):
        if name not in parameters:
            return f"takes no `{name}`, so it cannot be given {what}"
    return None


@dataclass
class Prefix:
    """The cached part each row may attend to: columns ``[start, end)``, at positions ``column - start``."""

    start: torch.Tensor  # (B,) first valid cache column (left padding)
    end: torch.Tensor  # (B,) one past the last cached column of the row


def _visible(prefix: Prefix, region_start: int, region_visible, q_pos, region_pos, window):
    batch, q = q_pos.shape
    cols = torch.arange(region_start, device=q_pos.device)
    prefix_ok = (cols >= prefix.start[:, None]) & (cols < prefix.end[:, None])  # (B, C)
    visible = torch.cat([prefix_ok[:, None, :].expand(batch, q, -1), region_visible], dim=-1)
    if window is not None:
        k_pos = torch.cat([cols[None, :] - prefix.start[:, None], region_pos], dim=-1)
        visible = visible & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    return visible


def forward_nodes(
    model,
    cache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    prefix: Prefix,
    region_visible: torch.Tensor,
    region_pos: torch.Tensor,
) -> torch.Tensor:
    """Run ``model`` on ``tokens`` (B, Q) appended to ``cache``; returns logits (B, Q, V). ``tokens`` may
    also be input embeddings (B, Q, E), as an EAGLE head is fed.

    Keys are the cache's ``prefix`` columns, then a *region*: columns from ``region_start = cache length -
    R_old`` onward, holding R_old nodes fed by earlier calls and the Q new ones, at positions
    ``region_pos`` (B, R_old + Q). ``region_visible`` (B, Q, R_old + Q) says which region nodes each new
    node sees (its ancestors and itself). Every node sees at least itself, so no softmax row is empty.
    """
    region_start = cache.get_seq_length() + tokens.shape[1] - region_visible.shape[-1]
    inputs = {"position_ids": positions, cache_keyword(model): cache, "use_cache": True}
    inputs["input_ids" if tokens.dtype == torch.long else "inputs_embeds"] = tokens
    if attention.use_kernel(tokens.device, attention.head_dim(model.config)):
        tree = attention.TreeInputs.build(prefix.start, prefix.end, region_start, region_visible, positions,
                                          region_pos)
        with attention.kernel_attention(model):
            return model(**inputs, tree=tree).logits

    dtype = model.dtype
    windows = layer_windows(model.config)

    def mask(window):
        vis = _visible(prefix, region_start, region_visible, positions, region_pos, window)
        return torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, torch.finfo(dtype).min)[:, None]

    if isinstance(windows, dict):
        attention_mask = {kind: mask(window) for kind, window in windows.items()}
    else:
        attention_mask = mask(windows)
    return model(**inputs, attention_mask=attention_mask).logits


def forward_tree(model, cache, tree: Tree, prefix: Prefix) -> torch.Tensor:
    """Run ``model`` on ``tree`` appended to ``cache``, each row's root at the position after its ``prefix``,
    every node seeing the prefix and its own ancestors; returns logits (B, N, V)."""
    positions = (prefix.end - prefix.start)[:, None] + tree.depth
    return forward_nodes(model, cache, tree.tokens, positions, prefix, tree.ancestors, positions)


def prefill(model, cache, tokens: torch.Tensor, start: torch.Tensor, begin: int = 0,
            chunk: int = 512) -> tuple[int, torch.Tensor | None]:
    """Feed columns ``[begin, W)`` of left-padded ``tokens`` (B, W) into a cache holding columns
    ``[0, begin)``, in chunks so the mask stays (chunk x W) rather than (W x W). Returns the passes run and
    the logits (B, V) at column W - 1 (None when there was nothing to feed)."""
    batch, width = tokens.shape[:2]
    cols = torch.arange(width, device=tokens.device)
    positions = (cols[None, :] - start[:, None]).clamp(min=0)
    real = cols[None, :] >= start[:, None]
    passes, logits = 0, None
    for c0 in range(begin, width, chunk):
        c1 = min(c0 + chunk, width)
        q = torch.arange(c0, c1, device=tokens.device)
        causal = (q[None, :, None] >= q[None, None, :]) & real[:, None, c0:c1]
        logits = forward_nodes(
            model, cache, tokens[:, c0:c1], positions[:, c0:c1],
            Prefix(start, torch.full_like(start, c0)),
            causal | torch.eye(c1 - c0, dtype=torch.bool, device=tokens.device),
            positions[:, c0:c1],
        )
        passes += 1
    return passes, None if logits is None else logits[:, -1]


def extend_chains(model, cache, tokens: torch.Tensor, count: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """Feed ragged chains ``tokens[b, :count[b]]`` that continue each row's prefix, keep them in the cache
    right after the prefix, and return the logits (B, Q, V)."""
    q = tokens.shape[1]
    steps = torch.arange(q, device=tokens.device)
    valid = steps[None, :] < count[:, None]
    positions = prefix.end[:, None] - prefix.start[:, None] + steps[None, :]
    visible = (steps[:, None] >= steps[None, :])[None] & valid[:, None, :]
    visible |= torch.eye(q, dtype=torch.bool, device=tokens.device)
    cache_len = cache.get_seq_length()
    logits = forward_nodes(model, cache, tokens, positions, prefix, visible, positions)
    cache.compact((cache_len + steps).expand(tokens.shape[0], -1), prefix.end, count)
    return logits
