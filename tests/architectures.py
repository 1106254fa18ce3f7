"""Every decoder-only causal LM the installed transformers provides, built tiny from its config class.

Found from transformers' auto mapping, so a new release's architectures are covered without editing this
file. Sizes are shrunk by field name, for whichever of these fields a config class takes; a class that still
cannot be built tiny makes ``build`` raise, and the breadth test skips it, saying why.
"""

from __future__ import annotations

import inspect

import torch
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from models import EOS, PAD, VOCAB

BOS = 1
LAYERS = 2

# Values by config field, where the class takes that field.
SMALL = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
    "initializer_range": 0.3, "tie_word_embeddings": False, "pad_token_id": PAD, "bos_token_id": BOS,
    "eos_token_id": EOS, "sliding_window": 6, "attention_chunk_size": 6,
    "n_embd": 32, "n_layer": LAYERS, "n_head": 4, "n_inner": 64, "n_positions": 256, "n_ctx": 256,
    "d_model": 32, "ffn_dim": 64, "num_layers": LAYERS, "num_heads": 4, "word_embed_proj_dim": 32,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "moe_topk": 2,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "rotary_dim": 8, "layer_norm_epsilon": 1e-5, "attention_types": [[["global", "local"], 1]],
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1, "state_size": 8,
    "vocab_size_per_layer_input": VOCAB, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "window_size": 4, "attn_layer_period": 2,
    "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_indices": [1],
    "keep_window_size": 4, "hidden_size_global": 32, "encoder_hash_byte_group_vocab": 64,
    "local_attention_window_len": 6, "ffn_hidden_size": 64, "kv_n_heads": 2,
    "shared_experts_intermediate_size": 32, "num_dense_layers": 1, "audio_vocab_size": 64, "d_inner": 64,
}
# What one type needs besides: a validator that the values above do not satisfy, or a field whose default its own
# code cannot build from. A sub-config's entry (a dict) is laid over that sub-config; a per-layer list replaces it.
TWEAKS = {
    "mamba2": {"head_dim": 16},
    # Its sliding layers override the attention sizes (per_layer_config); kept smaller, and other than the rest.
    "dots3_note_text": {"num_key_value_heads": 4, "per_layer_config": {1: {
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "qk_nope_head_dim": 12,
        "qk_rope_head_dim": 4}}},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "zaya": {"num_experts_per_tok": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # its default config has no layer types at all
    # Its code never applies its config's `sliding_window` (a plain causal mask), but specdec's masks would; its
    # default is the most positions it takes (3000), as this is, so that the window cuts nothing.
    "moshi": {"sliding_window": 256},
    # Its indexed layers always build the QSA indexer, which its default config leaves unset.
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "falcon_h1": {"mamba_d_ssm": 64},
    # Its default config gives no layer type RoPE parameters, which its code needs; here full layers have none (NoPE).
    "cohere_compass_text": {"layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": None}},
    # Its attention reads a RoPE base its attention config lacks, and clamps by a `clip_qkv` it cannot take as None.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 16], "axial_pos_embds_dim": [16, 16]},
}
# Per-layer lists: cut to the model's layers.
LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "block_types", "attention_layers")


def decoder_only() -> list[str]:
    """Model types whose causal-LM class is a decoder-only text model: not an encoder's or an encoder-decoder's,
    not an image-text model's (whose text model is listed under its own type), not one that writes no text."""
    names = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    other = set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(
        modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) | set(
        modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)
    return sorted(name for name, cls in names.items()
                  if name not in other and name in CONFIG_MAPPING and "ConditionalGeneration" not in cls
                  and "text_config" not in (getattr(CONFIG_MAPPING[name], "sub_configs", None) or {})
                  and _writes_text(name))


def _writes_text(model_type: str) -> bool:
    """Whether the type's causal-LM class generates text, by its ``output_modalities``: MusicGen's generate audio
    codes, one token per codebook in rows of their own."""
    try:
        model_class = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]
    except (ImportError, RuntimeError):  # not importable here: kept, so that the test says why it is skipped
        return True
    return "text" in model_class.output_modalities


def _per_layer(listed: list, layers: int) -> list:
    """The first ``layers`` entries of a per-layer list, with the first entry of another kind among them, so
    that a hybrid keeps each of its first two kinds of layer."""
    other = next((x for x in listed if x != listed[0]), listed[0])
    return ([listed[0], other] + list(listed[2:]))[:layers] if len(listed) >= layers else list(listed) * layers


def _shrunk(config_class, layers: int, tweaks: dict):
    """``config_class`` built with SMALL's values for the fields it has, its sub-configs shrunk too."""
    fields = set(inspect.signature(config_class.__init__).parameters)
    defaults = config_class()
    values = {name: value for name, value in {**SMALL, **tweaks}.items() if name in fields or hasattr(defaults, name)}
    if "kv_lora_rank" in values:  # latent attention expands its keys to every query head
        values["num_key_value_heads"] = values["num_attention_heads"]
    for name in LAYER_LISTS:
        listed = getattr(defaults, name, None)
        if name not in tweaks and isinstance(listed, (list, tuple)) and listed:
            values[name] = _per_layer(list(listed), layers)
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if isinstance(sub_class, type) and name in fields and sub_class.__name__ != "AutoConfig":
            values[name] = {**_shrunk(sub_class, layers, tweaks).to_dict(), **tweaks.get(name, {})}
    config = config_class(**{k: v for k, v in values.items() if k in fields})
    for name, value in values.items():
        if name not in fields and hasattr(config, name):
            try:
                setattr(config, name, value)
            except (AttributeError, NotImplementedError):  # a property derived from other fields, or refused
                pass
    return config


def build(model_type: str, seed: int = 0, max_parameters: int = 8_000_000):
    """A tiny random model of ``model_type`` in eval mode, with the test's pad and eos; SDPA attention where the
    class supports it, else eager. Raises if it is not tiny (a size field this file does not know)."""
    config = _shrunk(CONFIG_MAPPING[model_type], LAYERS, TWEAKS.get(model_type, {}))
    model_class = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    attn = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    with torch.device("meta"):
        count = sum(p.numel() for p in model_class(config).parameters())
    if count > max_parameters:
        raise ValueError(f"{model_type} is not tiny: {count} parameters")
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model
