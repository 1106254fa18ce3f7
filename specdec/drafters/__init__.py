"""Drafters: each proposes a token tree through the one interface in ``base``."""

from .base import Drafter
from .draft_model import DraftModel
from .prompt_lookup import PromptLookup

__all__ = ["Drafter", "DraftModel", "PromptLookup"]
