"""The target's features: the hidden state its LM head reads at each position, which Medusa and EAGLE
heads draft from.

A forward pre-hook on the model's output embeddings captures them, so every causal LM provides them
without modeling code, and without ``output_hidden_states`` (which would keep every layer's states).
"""

from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def capture(model, enabled: bool = True):
    """Inside the block, every call of ``model``'s LM head from this thread appends its input (B, Q, H) to the
    yielded list: calls on the same model from other threads have their own blocks and lists."""
    captured: list = []
    if not enabled:
        yield captured
        return
    thread = threading.get_ident()

    def hook(module, args):
        if threading.get_ident() == thread:
            captured.append(args[0])

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
