"""Which torch device a verb runs on: the one device rule, applied by every verb that takes one.

A device is "auto" (a GPU when one is present, else the CPU), "cpu", "cuda" or "cuda:N"; anything
else is a ParameterError naming `device`, before torch sees it. The API verbs (query, retrieve,
tail_patch, token_contributions, select, validate, ingest_gradients) and the CLI's --device all
pass through `resolve_device`, so `db.query(..., device="auto")` works wherever a device is taken.
"""

from __future__ import annotations

import os
import re

from trackstar_db.errors import ParameterError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(device) -> str | None:
    """What is wrong with `device` as a device name, or None."""
    if not isinstance(device, str) or not _FORM.fullmatch(device):
        return f"must be one of {', '.join(DEVICES)}, not {device!r}"
    return None


class _DeviceRule:
    """The device rule as an option rule (option_checks.py: anything with `problem(value)`)."""

    problem = staticmethod(device_problem)

    def __repr__(self) -> str:
        return "DEVICE"


DEVICE = _DeviceRule()


def resolve_device(device: str = "auto") -> str:
    """The torch device `device` names: 'auto' a GPU when one is present, else the CPU; 'cuda' under a
    multi-process launcher (torchrun sets LOCAL_RANK) this process's GPU. A GPU asked for and absent,
    or a name outside DEVICES, is a ParameterError."""
    problem = device_problem(device)
    if problem:
        raise ParameterError("device", problem)
    if device == "cpu":
        return device
    import torch  # heavy: torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", f"{device}: no CUDA GPU is available here")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ParameterError("device", f"{device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
