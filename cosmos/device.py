"""Device choice and mixed precision, in one place: cuda when present, bf16 autocast when asked."""
from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


def autocast(device: torch.device | str, precision: str = "fp32"):
    """Context manager for a forward pass in `precision` ("fp32" or "bf16") on `device`."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")
