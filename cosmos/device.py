"""Device choice and mixed precision, in one place: cuda when present, bf16 autocast when asked."""
from __future__ import annotations

import contextlib

import torch

from .errors import CosmosError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """What this machine offers, in words for messages: cpu, cuda:0 .. cuda:N-1, mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: `device` checked against this machine (a CosmosError naming it and what is available,
    before anything is loaded), or cuda when present, else cpu."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        parsed = device
    else:
        text = str(device).strip()
        if not text:
            raise CosmosError(f"device '': give a device, e.g. cpu or cuda (available here: "
                              f"{', '.join(available_devices())})")
        try:
            parsed = torch.device(text)
        except (RuntimeError, ValueError):
            raise CosmosError(f"device {text!r} is not a device name PyTorch knows; available here: "
                              f"{', '.join(available_devices())}") from None
    available = available_devices()
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CosmosError(f"device {str(device)!r}: CUDA is not available on this machine (available: "
                              f"{', '.join(available)})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CosmosError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(available: {', '.join(available)})")
        return parsed
    if parsed.type == "mps" and "mps" in available:
        return parsed
    raise CosmosError(f"device {str(device)!r} is not available on this machine (available: {', '.join(available)})")


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
