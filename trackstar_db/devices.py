"""Which torch device a command runs on."""

from __future__ import annotations

import os

from trackstar_db.errors import ParameterError


def resolve_device(device: str = "auto") -> str:
    """'auto': a GPU when one is present, else the CPU; 'cuda' under a multi-process launcher
    (torchrun sets LOCAL_RANK) means this process's GPU. A GPU asked for and absent is an error."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", f"{device}: no CUDA GPU is available here")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
