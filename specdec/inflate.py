"""Function-preserving inflation: a trained model rewritten at a larger shape that computes the same function.

No model hub is reachable here, so the only trained models are small ones. Speculative decoding pays
according to what a target pass costs next to a draft pass, so a 197M target says little about an 8B one.
Inflation keeps what the small model predicts and gives it the bytes, kernels and cache of the named shape:

- The residual stream of width d becomes k copies of itself (k the largest power of two with k·d <= D),
  then zero padding up to D. Weights that write into the stream are copied into each copy's rows; weights that
  read it are divided by k over the copies (exact in binary floating point), and read zeros from the padding.
  RMSNorm sees the same mean(x²) over the copies, so where D = k·d nothing else changes; with padding it sees
  mean(x²)·kd/D, and each hidden norm's weight is scaled by sqrt(kd/D) and the epsilon by kd/D.
- New attention heads and MLP units read the stream through random weights, but their outgoing weights (o_proj
  and down_proj columns) are zero. New layers append after the source's, with zero o_proj and down_proj.
- The source's head dimension is kept (RoPE ties its frequencies to it): the shape's width is reached with
  more heads, and its KV width (kv heads × head dim, the cache's bytes) with more KV heads. A source with the
  shape's head dimension inflates to its exact head layout. Query heads keep their KV head (GQA): source KV
  heads are copied as often as the new group size needs.

So the logits equal the source's to float rounding, in fp32 always and in bf16 too where D/d is a power of two
(otherwise the scaled norm weights round). The vocabulary and tokenizer stay the source's, so the embedding and
LM head are smaller than the named model's; tied ones are untied where the stream is copied. Qwen3's q/k norms normalise over the head dimension with the
config's one epsilon: where the stream is padded, the scaled epsilon moves them by about eps/mean(q²).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Shape:
    """What a model's step reads: widths, depth and the KV cache per token."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def scaled(self, factor: int) -> "Shape":
        """The same depth and head counts with every width divided by ``factor``: a named shape at test size."""
        return replace(self, hidden=self.hidden // factor, intermediate=self.intermediate // factor,
                       head_dim=max(self.head_dim // factor, 1))


SHAPES = {
    "llama-3.2-1b": Shape(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, head_dim=64),
    "llama-3-8b": Shape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
    "llama-3-70b": Shape(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, head_dim=128),
}


def shape_of(name_or_shape) -> Shape:
    if isinstance(name_or_shape, Shape):
        return name_or_shape
    if name_or_shape not in SHAPES:
        raise ValueError(f"Unknown shape {name_or_shape!r}: name one of {sorted(SHAPES)} or pass a "
                         f"specdec.inflate.Shape of explicit sizes.")
    return SHAPES[name_or_shape]


@dataclass(frozen=True)
class Plan:
    """Where each source unit lands. ``stream``: the inflated stream's copies of the source's (k·d places);
    ``q_rows``: the inflated q_proj row of each source q_proj row (and o_proj column); ``kv_dst``/``kv_src``:
    inflated k/v rows and the source rows copied into them."""

    d: int
    D: int
    copies: int
    m: int
    M: int
    layers: int
    q_rows: torch.Tensor
    kv_dst: torch.Tensor
    kv_src: torch.Tensor

    @property
    def stream(self) -> int:
        """Width of the copies; the rest of the inflated stream is zero."""
        return self.copies * self.d


def plan(config, shape: Shape) -> Plan:
    """Checks that ``shape`` holds ``config`` and places the source's heads; raises naming what does not fit."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"Cannot inflate a {config.model_type!r} model: inflation knows the {ARCHITECTURES} "
                         "layouts (RMSNorm, rotary attention, gated MLP).")
    d, hd = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    smaller = {name: (ours, theirs) for name, ours, theirs in (
        ("hidden", d, shape.hidden), ("layers", config.num_hidden_layers, shape.layers),
        ("intermediate", config.intermediate_size, shape.intermediate), ("kv width", kv * hd, shape.kv_width))
        if theirs < ours}
    if smaller:
        raise ValueError(f"The shape is smaller than the source in {smaller} (source, shape): inflate to a larger shape.")
    if shape.hidden % hd or shape.kv_width % hd:
        raise ValueError(f"The source's head dimension {hd} must divide the shape's hidden size {shape.hidden} "
                         f"and KV width {shape.kv_width}.")
    new_heads, new_kv = shape.hidden // hd, shape.kv_width // hd
    if new_heads % new_kv:
        raise ValueError(f"The shape's {new_heads} query heads of dimension {hd} do not form whole groups over its "
                         f"{new_kv} KV heads; choose a hidden size that is a multiple of the KV width.")
    group, new_group = heads // kv, new_heads // new_kv
    copies = math.ceil(group / new_group)  # inflated KV heads per source KV head
    if kv * copies > new_kv:
        raise ValueError(f"The shape's {new_kv} KV heads of dimension {hd} cannot hold the source's {kv} KV heads "
                         f"in groups of {new_group} query heads; choose a shape with a wider KV cache.")
    source = torch.arange(heads)
    slot = (source // group) * copies + (source % group) // new_group  # inflated KV head of each q head
    q_heads = slot * new_group + (source % group) % new_group
    kv_heads = torch.arange(kv * copies)
    return Plan(d=d, D=shape.hidden, copies=_copies(d, shape.hidden), m=config.intermediate_size, M=shape.intermediate,
                layers=config.num_hidden_layers, q_rows=_rows(q_heads, hd), kv_dst=_rows(kv_heads, hd),
                kv_src=_rows(kv_heads // copies, hd))


def _copies(d: int, D: int) -> int:
    """How many copies of a stream of width d fit in D: the largest power of two, so dividing by it is exact."""
    return 2 ** int(math.log2(D // d))


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def inflated_config(config, shape: Shape, p: Plan):
    """``config`` at ``shape`` (placed by ``p``), with the head dimension kept and the norms' epsilon scaled by kd/D."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    new = copy.deepcopy(config)
    new.hidden_size, new.intermediate_size, new.num_hidden_layers = shape.hidden, shape.intermediate, shape.layers
    new.num_attention_heads, new.num_key_value_heads, new.head_dim = shape.hidden // hd, shape.kv_width // hd, hd
    new.rms_norm_eps = config.rms_norm_eps * p.stream / p.D
    if p.copies > 1:  # the embedding writes each copy, the LM head reads them divided: one matrix cannot do both
        new.tie_word_embeddings = False
    if getattr(config, "layer_types", None) is not None:
        new.layer_types = list(config.layer_types) + [config.layer_types[-1]] * (shape.layers - len(config.layer_types))
    return new


@torch.no_grad()
def inflate(model, shape, *, device=None, dtype=None, seed: int = 0):
    """A new model of ``model``'s class at ``shape`` (a name in ``SHAPES`` or a :class:`Shape`) whose logits equal
    ``model``'s. Built on ``device`` in ``dtype`` (default: the source's); ``model`` is not modified."""
    from transformers import AutoModelForCausalLM

    shape = shape_of(shape)
    p = plan(model.config, shape)
    config = inflated_config(model.config, shape, p)
    device = torch.device(device) if device is not None else model.device
    torch.manual_seed(seed)
    with torch.device(device):
        new = AutoModelForCausalLM.from_config(config, dtype=dtype or model.dtype)
    new.generation_config = copy.deepcopy(model.generation_config)
    fill(new, model.state_dict(), p)
    return new.eval()


def fill(new, source: dict, p: Plan) -> None:
    """Writes ``source``'s tensors (a state dict) into ``new``'s parameters at their places in the plan; new
    units keep their random incoming weights and get zero outgoing ones."""
    params = dict(new.named_parameters())  # tied weights appear once
    for name, param in params.items():
        src = source.get(name)
        value = _place(name, param, None if src is None else src.to(param.device, param.dtype), p)
        param.copy_(value)


def _place(name: str, new: torch.Tensor, src: torch.Tensor | None, p: Plan) -> torch.Tensor:
    out = new.clone()
    writes = name.endswith(("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias"))
    if src is None:  # a new layer: it must add nothing to the stream
        if writes:
            out.zero_()
        elif "layers." not in name:
            raise ValueError(f"Cannot inflate parameter {name!r}: the source has no such tensor.")
        return out
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        out.copy_(src)
    elif name.endswith("norm.weight"):
        out[:p.stream] = src.repeat(p.copies) * math.sqrt(p.stream / p.D)
    elif name.endswith("embed_tokens.weight"):
        out.zero_()
        out[:, :p.stream] = src.repeat(1, p.copies)
    elif name.endswith("lm_head.weight"):
        out[:, :p.stream] = _read(src, p)
    elif name.endswith(("q_proj.weight", "q_proj.bias")):
        _set_reading(out, p.q_rows, p, src)
    elif name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        _set_reading(out, p.kv_dst, p, src[p.kv_src])
    elif name.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
        _set_reading(out, slice(0, p.m), p, src)
    elif name.endswith(("o_proj.weight", "down_proj.weight")):
        out.zero_()
        columns = p.q_rows if name.endswith("o_proj.weight") else slice(0, p.m)
        out[:p.stream, columns] = src.repeat(p.copies, 1)
    elif name.endswith(("o_proj.bias", "down_proj.bias")):
        out.zero_()
        out[:p.stream] = src.repeat(p.copies)
    else:
        raise ValueError(f"Cannot inflate parameter {name!r}: inflation knows {ARCHITECTURES} decoder layers.")
    return out


def _read(src: torch.Tensor, p: Plan) -> torch.Tensor:
    """A weight reading the source's stream (out, d), as one reading its k copies: each column divided by k."""
    return src.repeat(1, p.copies) / p.copies


def _set_reading(out: torch.Tensor, rows, p: Plan, value: torch.Tensor) -> None:
    """Writes ``value`` into ``rows`` of a weight that reads the stream (over its copies), or of its bias."""
    if out.dim() == 1:
        out[rows] = value
    else:
        out[rows, :p.stream] = _read(value, p)


@torch.no_grad()
def inflate_head(head, target, shape):
    """A Medusa or EAGLE head for ``target``, an inflation of ``head``'s target to ``shape``, that drafts exactly
    what ``head`` drafts: the inflated target's features are the source's, copied and zero-padded as its stream
    is, so the head is inflated the same way (its decoder layer as the target's layers are)."""
    from .heads.store import build

    shape = shape_of(shape)
    new = build(head.kind, target, **head.options)
    source = head.state_dict()
    if head.kind == "eagle":
        p = plan(head.decoder.config, replace(shape, layers=1))
    else:  # Medusa's blocks read and write only the stream
        d, none = head.blocks[0][0].linear.in_features, torch.empty(0, dtype=torch.long)
        p = Plan(d, shape.hidden, _copies(d, shape.hidden), 0, 0, 0, none, none, none)
    for name, param in new.named_parameters():
        src = source[name].to(param.device, param.dtype)
        param.copy_(_place(name, param, src, p) if name.startswith("decoder.") else _pad_head(name, param, src, p))
    return new.eval()


def _pad_head(name: str, new: torch.Tensor, src: torch.Tensor, p: Plan) -> torch.Tensor:
    """Medusa's residual blocks and EAGLE's fc: they read the stream's copies and write each copy. fc reads
    [feature ‖ embedding]: each half is a stream of its own."""
    out = torch.zeros_like(new)
    if src.dim() == 1:
        out[:p.stream] = src.repeat(p.copies)
    elif name == "fc.weight":
        out[:p.stream, :p.stream] = _read(src[:, :p.d], p).repeat(p.copies, 1)
        out[:p.stream, p.D:p.D + p.stream] = _read(src[:, p.d:], p).repeat(p.copies, 1)
    else:
        out[:p.stream, :p.stream] = _read(src, p).repeat(p.copies, 1)
    return out


def inflate_models(models, shape, draft_shape=None, *, heads_dir):
    """``models`` (``specdec.embedded.Models``) with the target inflated to ``shape``, the draft to ``draft_shape``
    (kept as it is when None), and the heads inflated with the target and saved under ``heads_dir``."""
    from .heads.store import load_head, save

    target = inflate(models.target, shape)
    draft = models.draft
    if draft is not None and draft_shape is not None:
        draft = inflate(draft, draft_shape)
    found = {}
    for kind in ("medusa", "eagle"):
        path = getattr(models, kind)
        if path is not None:
            head = load_head(path, models.target)
            found[kind] = Path(heads_dir) / kind
            save(inflate_head(head, target, shape), found[kind], training={"inflated_from": str(path)})
    recipe = {**models.recipe, "inflated": {"target": str(shape_of(shape)), "draft": str(draft_shape and shape_of(draft_shape))}}
    return replace(models, target=target, draft=draft, recipe=recipe, **found)


def inflate_directory(src, out, shape, draft_shape=None, device="cpu"):
    """Writes to ``out`` the inflation of ``src``: a model saved with ``save_pretrained`` (to ``shape``), or a
    directory ``specdec pretrain`` wrote (target and heads to ``shape``, the draft to ``draft_shape`` or copied).
    Yields a line for each part written."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import load

    src, out = Path(src), Path(out)
    if draft_shape is not None and not (src / "draft" / "config.json").is_file():
        raise ValueError(f"--draft-shape given, but {str(src)!r} has no draft/ to inflate.")
    if (src / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto").to(device)
        _save(inflate(model, shape), AutoTokenizer.from_pretrained(src), out)
        yield f"wrote {out} ({shape_of(shape)})"
        return
    dtype = json.loads((src / "target" / "config.json").read_text()).get("dtype", "float32")
    models = load(src, device=device, dtype=getattr(torch, dtype))
    big = inflate_models(models, shape, draft_shape, heads_dir=out)
    _save(big.target, models.tokenizer, out / "target")
    yield f"wrote {out / 'target'} ({shape_of(shape)})"
    if big.draft is not None:
        _save(big.draft, models.tokenizer, out / "draft")
        yield f"wrote {out / 'draft'} ({shape_of(draft_shape) if draft_shape else 'copied'})"
    for kind in ("medusa", "eagle"):
        if getattr(big, kind) is not None:
            yield f"wrote {out / kind} (inflated with the target)"
    (out / "recipe.json").write_text(json.dumps({**big.recipe, "inflated_from": str(src)}, indent=1))
    if (src / "corpus.json").is_file():
        shutil.copy(src / "corpus.json", out / "corpus.json")


def _save(model, tokenizer, path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
