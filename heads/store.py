"""Saved heads: ``config.json`` (kind, options, the target's fingerprint, training record) beside
``heads.safetensors``. Loading checks the target before building anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from .eagle import Eagle, EagleHead
from .medusa import Medusa, MedusaHeads
from .target import check_fingerprint

KINDS = {"medusa": (MedusaHeads, Medusa), "eagle": (EagleHead, Eagle)}
CONFIG, WEIGHTS = "config.json", "heads.safetensors"


def build(kind: str, target, **options):
    """A new, untrained head of ``kind`` for ``target``."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {sorted(KINDS)}, got {kind!r}.")
    return KINDS[kind][0](target, **options)


def drafter(head, **options):
    """The drafter that drafts with ``head``: ``Medusa`` or ``Eagle``, with their ``options``."""
    return KINDS[head.kind][1](head, **options)


def save(head, path, training: dict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"kind": head.kind, "options": head.options, "target": head.target_fingerprint,
              "training": training or {}}
    state = {name: tensor.detach().contiguous() for name, tensor in head.state_dict().items()}
    (path / CONFIG).write_text(json.dumps(config, indent=1))
    save_file(state, path / WEIGHTS)
    os.chmod(path / WEIGHTS, (path / CONFIG).stat().st_mode & 0o777)  # safetensors writes 0600 whatever the umask


def read_config(path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"No saved heads at {str(path)!r}: expected {CONFIG} and {WEIGHTS} there.")
    return json.loads((path / CONFIG).read_text())


def load_head(path, target):
    """The trained head saved at ``path``, on the target's device and dtype; refuses another target."""
    config = read_config(path)
    check_fingerprint(config["target"], target, f"The heads at {str(path)!r}")
    head = build(config["kind"], target, **config["options"])
    head.load_state_dict(load_file(Path(path) / WEIGHTS))
    return head.to(target.device, target.dtype).eval()


def load(path, target, **drafter_options):
    """A drafter for ``target`` from heads saved at ``path``: ``Medusa`` or ``Eagle``, with
    ``drafter_options`` (``top_k``, ``tree``, ``depth``, ``total_tokens``) passed on."""
    return drafter(load_head(path, target), **drafter_options)
