"""Kernel tests: without CUDA, run the Triton kernels on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton (or any module with @triton.jit kernels) is imported:
`triton.jit` picks the interpreter at decoration time. With CUDA the kernels compile for real and
the same tests run on the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-offs on a busy two-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
