"""gpt-fast (github pytorch-labs/gpt-fast) run beside specdec as a benchmark peer, on the same HF Llama weights.

gpt-fast is third-party code and never becomes part of specdec: its files are loaded from the checkout a
benchmark names (see ``shared/peers/README.md`` for the commit and why), unmodified. Everything it needs that
its own ``main()`` would do (converting weights, compiling, the fixes later torch versions need) is done here
from outside, so that its numbers are its code's numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import sys
import types
import warnings
from pathlib import Path

import torch
from einops import rearrange
import torch._inductor.config as inductor_config

# What gpt-fast's generate.py sets at import, for the whole process. Applied only around its own calls here,
# so that other strategies timed in the same process compile under the process's own settings.
INDUCTOR = {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True, "fx_graph_cache": True}
LAYER_NAMES = {  # HF name -> gpt-fast name inside a layer, as scripts/convert_hf_checkpoint.py maps them
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_MODULES: dict[Path, tuple[types.ModuleType, types.ModuleType]] = {}
_loads = itertools.count()


def _tokenizer_placeholder() -> types.ModuleType:
    """Stands in for gpt-fast's tokenizer.py while generate.py imports it: that file imports sentencepiece and
    tiktoken at its top, which specdec neither needs nor installs (it passes token ids; only gpt-fast's
    ``main()`` tokenizes)."""
    module = types.ModuleType("tokenizer")

    def get_tokenizer(*args, **kwargs):
        raise RuntimeError("gpt-fast's tokenizer is not loaded by specdec.gpt_fast: pass token ids.")

    module.get_tokenizer = get_tokenizer
    return module


def _exec(name: str, file: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load(path: str | Path) -> tuple[types.ModuleType, types.ModuleType]:
    """gpt-fast's ``model`` and ``generate`` modules from the checkout at ``path``, once per checkout, under
    names of their own. generate.py's ``from model import ...``/``from tokenizer import ...`` see them under
    those plain names only while it imports; its ``sys.path`` entry and inductor settings are undone after."""
    path = Path(path).resolve()
    if path in _MODULES:
        return _MODULES[path]
    if not (path / "model.py").is_file() or not (path / "generate.py").is_file():
        raise FileNotFoundError(f"No gpt-fast checkout at {str(path)!r} (model.py and generate.py expected).")
    n = next(_loads)
    suffix = f"_{n}" if n else ""
    model = _exec(f"gpt_fast_model{suffix}", path / "model.py")
    saved_modules = {name: sys.modules.get(name) for name in ("model", "tokenizer")}
    saved_path = list(sys.path)
    sys.modules.update(model=model, tokenizer=_tokenizer_placeholder())
    try:
        with inductor_config.patch(INDUCTOR):  # restores the process's values once generate.py has set them
            generate = _exec(f"gpt_fast_generate{suffix}", path / "generate.py")
    finally:
        sys.path[:] = saved_path
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    _MODULES[path] = model, generate
    return model, generate


def _refuse_unsupported(config) -> None:
    """gpt-fast's Transformer is plain Llama: anything it would silently compute differently is refused."""
    if config.model_type != "llama":
        raise ValueError(f"gpt-fast's Transformer cannot run this model: its architecture is "
                         f"{config.model_type!r}, not 'llama'.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    reasons = [
        getattr(config, "attention_bias", False) and "its attention projections have biases",
        getattr(config, "mlp_bias", False) and "its MLP projections have biases",
        rope_type != "default" and f"its RoPE type is {rope_type!r}, not 'default'",
        getattr(config, "hidden_act", "silu") != "silu" and f"its activation is {config.hidden_act!r}, not silu",
        head_dim * config.num_attention_heads != config.hidden_size
        and f"its head_dim {head_dim} is not hidden_size // num_attention_heads (gpt-fast derives it so)",
    ]
    reasons = [r for r in reasons if r]
    if reasons:
        raise ValueError(f"gpt-fast's Transformer cannot run this model: {'; '.join(reasons)}.")


def _args(config, model_args: type):
    rope = getattr(config, "rope_parameters", None) or {}
    return model_args(
        block_size=config.max_position_embeddings, vocab_size=config.vocab_size,
        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
        n_local_heads=config.num_key_value_heads, dim=config.hidden_size,
        intermediate_size=config.intermediate_size, norm_eps=config.rms_norm_eps,
        rope_base=rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
    )


def _interleave_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k projection rows ``w`` (n_head * head_dim, dim) from HF's rotate-half RoPE layout (a head's pairs
    are rows j and j + head_dim/2) to gpt-fast's interleaved one (rows 2j and 2j+1); q.k is unchanged."""
    return rearrange(w, "(head pair half) dim -> (head half pair) dim", head=n_head, pair=2)


def convert(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """HF ``LlamaForCausalLM`` ``model`` as gpt-fast's ``Transformer`` (from the checkout at ``path``), on its
    device and dtype, in eval mode, without caches. Weights gpt-fast keeps as they are share ``model``'s
    storage (no second copy on the GPU); q/k/v are permuted and merged into ``wqkv``."""
    config = model.config
    _refuse_unsupported(config)
    gpt_model, _ = _load(path)
    args = _args(config, gpt_model.ModelArgs)
    hf = {name: t.detach() for name, t in model.state_dict().items()}
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "output.weight": model.get_output_embeddings().weight.detach()}  # the embedding itself when tied
    for i in range(args.n_layer):
        layer = f"model.layers.{i}."
        for name, gpt_name in LAYER_NAMES.items():
            state[f"layers.{i}.{gpt_name}.weight"] = hf[f"{layer}{name}.weight"]
        q = _interleave_rope(hf[f"{layer}self_attn.q_proj.weight"], args.n_head)
        k = _interleave_rope(hf[f"{layer}self_attn.k_proj.weight"], args.n_local_heads)
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, hf[f"{layer}self_attn.v_proj.weight"]])
    with torch.device("meta"):
        transformer = gpt_model.Transformer(args)
    transformer.load_state_dict(state, strict=True, assign=True)
    return transformer.requires_grad_(False).eval()


def _returning_clones(decode_one_token):
    """``decode_one_token`` compiled as gpt-fast's ``main()`` compiles it, returning clones of its outputs:
    under torch>=2.11's CUDA-graph trees the next replay overwrites them while gpt-fast still reads them
    (its decode loop feeds the token back in), which stops the loop with "accessing tensor output of
    CUDAGraphs that has been overwritten". Upstream's own later fix clones too."""
    compiled = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    def decode(*args, **kwargs):
        token, probs = compiled(*args, **kwargs)
        return token.clone(), probs.clone()

    return decode


class GptFast:
    """gpt-fast's plain and speculative decoding of ``target`` (drafted by ``draft``), both HF Llama models
    converted to its Transformer on their own device and dtype. ``compile`` None compiles on CUDA only, as
    gpt-fast's ``main()`` does: ``decode_one_token`` and, with a draft, ``model_forward`` (mode
    "reduce-overhead", fullgraph). Caches are made once, for ``max_length`` positions (prompt and new tokens;
    default: the models' block size, max_position_embeddings), so that a new prompt length never re-creates
    them (which would recompile); its attention reads the whole cache, as gpt-fast's does."""

    def __init__(self, path: str | Path, target: torch.nn.Module, draft: torch.nn.Module | None = None, *,
                 compile: bool | None = None, speculate_k: int = 6, max_length: int | None = None):
        if draft is not None and draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft's vocab_size {draft.config.vocab_size} is not target's "
                             f"{target.config.vocab_size}: gpt-fast compares their distributions token by token.")
        _, self.generate_module = _load(path)
        self.target = convert(target, path)
        self.draft = convert(draft, path) if draft is not None else None
        self.speculate_k = speculate_k
        self.device = next(self.target.parameters()).device
        self.block_size = min(m.config.block_size for m in (self.target, self.draft) if m is not None)
        if max_length is not None:
            self.block_size = min(self.block_size, max_length + speculate_k + 1)
        for model in (self.target, self.draft):
            if model is not None:
                with torch.device(self.device):
                    model.setup_caches(max_batch_size=1, max_seq_length=self.block_size)
        if compile is None:
            compile = self.device.type == "cuda"
        g = self.generate_module
        self.decode_one_token = _returning_clones(g.decode_one_token) if compile else g.decode_one_token
        compile_forward = compile and draft is not None
        self.model_forward = (torch.compile(g.model_forward, mode="reduce-overhead", fullgraph=True)
                              if compile_forward else g.model_forward)

    @contextlib.contextmanager
    def _running(self):
        """gpt-fast's inductor settings and this instance's (compiled or not) functions, for one of its calls.
        Its decode loop enters ``torch.backends.cuda.sdp_kernel``, deprecated since torch 2.3 but still
        working in 2.13 (it forwards to ``torch.nn.attention.sdpa_kernel``): its FutureWarning is silenced."""
        g = self.generate_module
        saved = g.decode_one_token, g.model_forward
        g.decode_one_token, g.model_forward = self.decode_one_token, self.model_forward
        try:
            with inductor_config.patch(INDUCTOR), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*sdp_kernel\(\)` is deprecated", category=FutureWarning)
                yield g
        finally:
            g.decode_one_token, g.model_forward = saved

    def _prompt(self, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        """``input_ids`` (1, P) as gpt-fast's prompt (P,), when positions up to P + ``length`` fit the caches."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: gpt-fast decodes one row, (1, P).")
        if input_ids.shape[1] + length > self.block_size:
            raise ValueError(f"{input_ids.shape[1]} prompt tokens and {length} more positions do not fit the "
                             f"block size {self.block_size}: ask for fewer max_new_tokens.")
        return input_ids[0].to(self.device, torch.long)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The converted target's logits (1, T, V) over ``input_ids`` (1, T) from position 0, to check the
        conversion against transformers' before timing."""
        prompt = self._prompt(input_ids, 0)
        return self.target(prompt[None], torch.arange(prompt.shape[0], device=self.device))

    @torch.no_grad()
    def check(self, target: torch.nn.Module, input_ids: torch.Tensor) -> float:
        """Refuses to time a conversion that computes another function: the converted target's logits over
        ``input_ids`` (1, T) against ``target``'s, by relative norm (fp32 agrees to about 1e-6, bf16 to 1e-2)."""
        theirs = self.logits(input_ids).float()
        ours = target(input_ids.to(self.device)).logits.float()
        error = float((theirs - ours).norm() / ours.norm())
        limit = 5e-2 if target.dtype in (torch.bfloat16, torch.float16) else 1e-4
        if not error < limit:
            raise ValueError(f"gpt-fast's converted model gives logits {error:.2g} away from transformers' "
                             f"(relative norm, limit {limit:g}): its conversion does not fit this model.")
        return error

    def plain(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
              temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
        """gpt-fast's plain decoding: ``input_ids`` (1, P) -> (sequences (1, P + max_new_tokens), counts)."""
        if max_new_tokens < 2:
            raise ValueError("max_new_tokens must be at least 2: gpt-fast's plain loop concatenates the tokens "
                             "after the first, and fails on none.")
        seq, _ = self._generate(input_ids, max_new_tokens, None, do_sample, temperature)
        return seq, dict(target_forwards=max_new_tokens, drafted=0, accepted=0)

    def speculative(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                    temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
        """gpt-fast's speculative decoding, ``speculate_k`` tokens drafted a step: ``input_ids`` (1, P) ->
        (sequences (1, P + max_new_tokens), counts). It neither stops at eos nor runs batches."""
        if self.draft is None:
            raise ValueError("speculative decoding needs a draft: pass draft= to GptFast.")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        seq, accept_counts = self._generate(input_ids, max_new_tokens, self.draft, do_sample, temperature)
        steps = sum(accept_counts)
        return seq, dict(target_forwards=steps + 1, drafted=steps * self.speculate_k,
                         accepted=sum(n * count for n, count in enumerate(accept_counts)))

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, draft: torch.nn.Module | None,
                  do_sample: bool, temperature: float) -> tuple[torch.Tensor, list[int]]:
        """gpt-fast's ``generate`` on ``input_ids`` (1, P); greedy is its own sampler at temperature 0, which its
        ``max(temperature, 1e-5)`` turns into an argmax. Returns sequences (1, P + max_new_tokens) and its
        accept_counts (verification steps by number of drafts accepted)."""
        # A speculative step writes speculate_k + 1 positions past the last token it keeps.
        prompt = self._prompt(input_ids, max_new_tokens + (self.speculate_k + 1 if draft is not None else 0))
        with self._running() as g:
            seq, stats = g.generate(self.target, prompt, max_new_tokens, interactive=False, draft_model=draft,
                                    speculate_k=self.speculate_k, temperature=temperature if do_sample else 0.0,
                                    top_k=None)
        return seq[None], stats["accept_counts"]
