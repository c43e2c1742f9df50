"""Which floating-point arithmetic a run uses: the autocast dtype and TF32.

:func:`autocast_dtype` is a pure function of the requested ``amp`` setting and the device's
capabilities (:class:`DeviceCapabilities`, read once by :func:`capabilities`), so the choice
is testable without the device:

- CUDA with compute capability 8.0 or more (Ampere, Hopper, ...): bfloat16.
- Older CUDA cards: float16 with a ``GradScaler`` (:func:`needs_grad_scaler`);
  ``torch.cuda.is_bf16_supported()`` says yes there too, but through slow emulation.
- A CPU with native bfloat16 dot products (AVX512-BF16 / AMX): bfloat16; other CPUs: float32.

TF32 (:func:`set_tf32`) is set explicitly by every entry point rather than left to torch's
defaults (which differ between matmul and cuDNN): on for training, off wherever results are
compared for exactness, so "exact" means the same on an A100/H100 as on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from streamcnn.utils.cpu import native_bf16

__all__ = ["DeviceCapabilities", "capabilities", "autocast_dtype", "needs_grad_scaler", "set_tf32", "tf32_state",
           "BF16_MIN_CAPABILITY", "AMP_CHOICES"]

#: the first CUDA compute capability with native bfloat16 tensor cores (Ampere)
BF16_MIN_CAPABILITY = (8, 0)
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the precision choice depends on: the device type, a CUDA card's compute capability,
    and whether a CPU has native bfloat16 arithmetic."""

    type: str
    compute_capability: tuple[int, int] | None = None
    native_bf16: bool = False


def capabilities(device: torch.device | str) -> DeviceCapabilities:
    """The capabilities of ``device`` as this machine reports them."""
    device = torch.device(device)
    if device.type == "cuda":
        return DeviceCapabilities("cuda", tuple(torch.cuda.get_device_capability(device)))  # type: ignore[arg-type]
    return DeviceCapabilities(device.type, native_bf16=device.type == "cpu" and native_bf16())


def autocast_dtype(amp: str, device: DeviceCapabilities) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (auto|bf16|fp16|off) on ``device``; None means float32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"train.amp={amp!r} is not one of {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or off on CPU")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        capability = device.compute_capability or (0, 0)
        return torch.bfloat16 if tuple(capability) >= BF16_MIN_CAPABILITY else torch.float16
    return torch.bfloat16 if device.type == "cpu" and device.native_bf16 else None


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 do not."""
    return dtype == torch.float16


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, both at once (a no-op on CPU arithmetic)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> bool:
    """True when either CUDA matmuls or cuDNN convolutions may use TF32."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
