"""Tiny random causal LMs built from configs, one per architecture the engine promises to support."""

from __future__ import annotations

import copy

import torch
import transformers as tf

VOCAB = 96
PAD, EOS = 0, 3

# Sliding windows are shorter than the sequences the tests generate, so the window really cuts.
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 7}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"sliding_window": 5, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               {"sliding_window": 5, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window_pattern": 2}),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, {"ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 256}),
}


def tiny(arch: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    config_cls, model_cls, extra = ARCHS[arch]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=1, initializer_range=0.3, tie_word_embeddings=False,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


class Recorder:
    """A streamer that keeps what it is given: each chunk's tokens, and whether the call ended it."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A draft that agrees with ``model`` often but not always: the target with noisy weights."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


def prompts(batch: int, width: int, seed: int, ragged: bool = True):
    """Left-padded random prompts avoiding pad and eos; row lengths differ when ``ragged``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, width), generator=gen)
    mask = torch.ones_like(ids)
    if ragged and batch > 1:
        pads = torch.randint(0, width - 1, (batch,), generator=gen)
        pads[0] = 0
        for b, p in enumerate(pads.tolist()):
            ids[b, :p], mask[b, :p] = PAD, 0
    return ids, mask
