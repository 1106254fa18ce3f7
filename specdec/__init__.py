"""specdec: lossless speculative decoding for any Hugging Face causal LM."""

from .drafters import DraftModel, Drafter, PromptLookup
from .generate import SpeculativeModel, generate, wrap
from .output import SpeculativeOutput, Stats
from .session import release
from .tree import Tree
from . import heads  # last: the heads build on the engine above

__all__ = [
    "DraftModel", "Drafter", "PromptLookup", "SpeculativeModel", "SpeculativeOutput", "Stats", "Tree",
    "generate", "release", "wrap",
]
