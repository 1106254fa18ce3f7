"""Trained multi-token heads as drafters: Medusa heads and an EAGLE-style head, their storage and training.

``specdec.heads.load("heads/", model)`` returns a drafter for ``specdec.generate``; ``specdec-train-heads``
(``python -m specdec.heads.train``) trains them.
"""

from .eagle import Eagle, EagleHead
from .medusa import Medusa, MedusaHeads
from .store import build, drafter, load, load_head, save

__all__ = ["Eagle", "EagleHead", "Medusa", "MedusaHeads", "build", "drafter", "load", "load_head", "save"]
