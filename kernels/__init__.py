"""Triton kernels for the verifier: ``specdec.kernels``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; under ``TRITON_INTERPRET=1``, from a new thread's empty frame stack.

    CPython 3.11+ keeps Python frames in 16 KiB chunks and frees a chunk whenever the call that opened it
    returns. The interpreter runs millions of small calls per launch; begun at an unlucky stack depth (inside
    pytest, say), one of them opens a chunk each time, and the mmap, munmap and page faults it pays made a
    launch 2-3x slower, mostly in system time. A fresh thread starts every launch at the same shallow depth,
    whoever calls it."""
    if type(kernel).__name__ != "InterpretedFunction":
        kernel[grid](*args, **kwargs)
        return
    with ThreadPoolExecutor(1) as thread:
        thread.submit(kernel[grid], *args, **kwargs).result()
