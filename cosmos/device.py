"""Device choice and mixed precision, in one place: cuda when present, bf16 autocast when asked."""
from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16 support, or a CPU with AVX-512 BF16 / AMX.

    On a CPU without them (e.g. AVX2 only) PyTorch emulates bf16 and autocast is several times SLOWER than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":  # native bf16 from Ampere (compute capability 8.0) on; older GPUs emulate it
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """"auto" -> "bf16" where bf16 is fast on `device`, else "fp32"; "fp32" / "bf16" are kept as given."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    return precision


def autocast(device: torch.device | str, precision: str = "fp32"):
    """Context manager for a forward pass in `precision` ("fp32", "bf16" or "auto") on `device`."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
