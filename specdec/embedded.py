"""The demo models shipped inside the package, and the loader for any directory the recipe writes.

``specdec.pretrain --config embedded`` trained them on a GPU (its record is ``default_models/recipe.json``):
a Llama target and draft that write Python, sharing a byte-level BPE tokenizer, with trained Medusa heads
and an EAGLE head, about 11 MB together. They make ``specdec demo``, the notebooks and the README's examples
run on a fresh CPU-only machine with nothing downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .corpus import held_out_modules

DEFAULT = Path(__file__).with_name("default_models")
PARTS = ("target", "draft", "medusa", "eagle")


@dataclass
class Models:
    """A target with what drafts for it. ``medusa`` and ``eagle`` are saved-heads directories (for
    ``specdec.heads.load``), or None where there are none."""

    tokenizer: object
    target: torch.nn.Module
    draft: torch.nn.Module | None = None
    medusa: Path | None = None
    eagle: Path | None = None
    recipe: dict = field(default_factory=dict)

    def drafters(self, draft_tokens: int = 6, lookup_tokens: int = 10) -> dict:
        """Every drafter these models make, ready for ``generate(drafter=...)``: "draft model", "prompt lookup",
        and "medusa" and "eagle" (the saved heads, loaded for this target) where present."""
        from . import heads
        from .drafters import DraftModel, PromptLookup

        found = {} if self.draft is None else {"draft model": DraftModel(self.draft, num_draft_tokens=draft_tokens)}
        found["prompt lookup"] = PromptLookup(num_draft_tokens=lookup_tokens)
        for kind in ("medusa", "eagle"):
            if getattr(self, kind) is not None:
                found[kind] = heads.load(getattr(self, kind), self.target)
        return found

    def prompts(self, n: int, prompt_chars: int = 200) -> list[str]:
        """``n`` prefixes of functions from the modules the recipe held out of training."""
        return held_out_modules().held_out_prompts(n, prompt_chars)


def load(path: str | Path | None = None, *, target=None, draft=None, medusa=None, eagle=None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Models:
    """The models in ``path`` (a directory with ``target/`` and optionally ``draft/``, ``medusa/``, ``eagle/``,
    as ``specdec.pretrain`` writes), the embedded default when no path is given; a part passed by its own
    path replaces the directory's. fp32 on a CPU by default, where bf16 matmuls are slow."""
    root = Path(path) if path is not None else DEFAULT
    given = dict(target=target, draft=draft, medusa=medusa, eagle=eagle)
    paths = {p: Path(given[p]) if given[p] is not None else root / p for p in PARTS}
    if not (paths["target"] / "config.json").is_file():
        raise FileNotFoundError(f"No target model at {str(paths['target'])!r}: pass --models (`path`) a directory "
                                "that `specdec pretrain` wrote, or --target (`target`) a model saved with "
                                "`save_pretrained`.")
    for part in PARTS[1:]:
        if given[part] is not None and not paths[part].is_dir():
            raise FileNotFoundError(f"--{part} {str(paths[part])!r} is not a directory.")

    def model(part):
        return AutoModelForCausalLM.from_pretrained(paths[part], dtype=dtype).to(device).eval()

    recipe = root / "recipe.json"
    return Models(
        tokenizer=AutoTokenizer.from_pretrained(paths["target"]),
        target=model("target"),
        draft=model("draft") if (paths["draft"] / "config.json").is_file() else None,
        medusa=paths["medusa"] if (paths["medusa"] / "config.json").is_file() else None,
        eagle=paths["eagle"] if (paths["eagle"] / "config.json").is_file() else None,
        recipe=json.loads(recipe.read_text()) if recipe.is_file() else {},
    )
