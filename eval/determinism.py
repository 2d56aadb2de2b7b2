"""Deterministic execution for benchmark runs (``--deterministic``), and what it does and does not cover.

On CPU every run of this library with the same seed is already bitwise reproducible (tested: the same command
gives the same results.jsonl bytes, also after SIGKILL and resume). On CUDA, seeding is not enough: cuDNN may
pick a different convolution algorithm from run to run (``cudnn.benchmark``), the convolution backward that
tent, core and cafa run has non-deterministic algorithms, and cuBLAS needs a fixed workspace for reproducible
matrix products. :func:`enable_deterministic` switches all of these to their deterministic settings; an
operation that has no deterministic CUDA implementation then raises instead of silently differing.

Not covered, even with it: a different GPU model, driver, CUDA/cuDNN or PyTorch version, or batch size (results
may differ in the last bits and, through argmax ties and adaptation, slightly more); bf16 autocast and
``torch.compile`` change the arithmetic against eager float32 (deterministic from run to run, not equal to it).
Not measured on a GPU in this repository yet (no GPU was available).
"""
from __future__ import annotations

import os

import torch

#: cuBLAS workspace setting required for deterministic matrix products on CUDA >= 10.2.
CUBLAS_WORKSPACE = ":4096:8"


def enable_deterministic() -> None:
    """Deterministic algorithms everywhere (CPU and CUDA); call before the first CUDA operation."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            raise RuntimeError("--deterministic must be set before CUDA is initialised (set "
                               f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the environment instead)")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
