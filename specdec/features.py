"""The target's features: the hidden state its LM head reads at each position, which Medusa and EAGLE
heads draft from.

A forward pre-hook on the model's output embeddings captures them, so every causal LM provides them
without modeling code, and without ``output_hidden_states`` (which would keep every layer's states). The hook
is there only during the capturing call's own passes, and records only those: a context variable says whose
pass it is, so calls on the same model from other threads, or nested in this one, keep their own features.
"""

from __future__ import annotations

import contextlib
import contextvars

_capturing: contextvars.ContextVar = contextvars.ContextVar("specdec_features", default=None)


@contextlib.contextmanager
def capture(model, enabled: bool = True):
    """Inside the block, every call of ``model``'s LM head made for this block appends its input (B, Q, H) to
    the yielded list."""
    captured: list = []
    if not enabled:
        yield captured
        return

    def hook(module, args):
        if _capturing.get() is captured:
            captured.append(args[0])

    token = _capturing.set(captured)
    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
        _capturing.reset(token)
