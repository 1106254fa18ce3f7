"""Triton kernels for the verifier: ``specdec.kernels``."""
