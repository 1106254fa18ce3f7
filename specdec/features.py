"""The target's features: the hidden state its LM head reads at each position, which Medusa and EAGLE
heads draft from.

A forward pre-hook on the model's output embeddings captures them, so every causal LM provides them
without modeling code, and without ``output_hidden_states`` (which would keep every layer's states).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def capture(model, enabled: bool = True):
    """Inside the block, every call of ``model``'s LM head appends its input (B, Q, H) to the yielded list."""
    captured: list = []
    if not enabled:
        yield captured
        return
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()
