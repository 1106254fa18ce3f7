"""Triton kernels for the verifier: ``specdec.kernels``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from triton.runtime.interpreter import InterpretedFunction


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; under ``TRITON_INTERPRET=1`` from a new thread, at a shallow depth.

    CPython 3.11+ keeps frames in 16 KiB chunks and, until python/cpython#142183 (3.13 and 3.14 point
    releases), frees a chunk as soon as the call that opened it returns. The interpreter makes millions of
    small calls per launch: begun at an unlucky depth (under pytest, for one) one of them opened a chunk each
    time, and its mmap, munmap and page fault made the launch 2-3x slower, half of it system time. A new
    thread starts every launch on an empty stack, the same whoever calls it."""
    if not isinstance(kernel, InterpretedFunction):
        kernel[grid](*args, **kwargs)
        return
    with ThreadPoolExecutor(1) as thread:
        thread.submit(kernel[grid], *args, **kwargs).result()
