"""Trained multi-token prediction heads (Medusa, EAGLE) as drafters: ``specdec.heads``."""
