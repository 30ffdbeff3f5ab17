"""Which device a command runs on: one rule, so that training, eval, merge, quantize, chat and generate agree.

torch is imported inside the function, so importing this module stays cheap."""
from __future__ import annotations

from ftctl.core.errors import ConfigError


def pick_device(preference: str | None = None):
    """The ``torch.device`` to run on. ``None``, ``""`` or ``"auto"``: the GPU (``cuda``) when one is
    available, the CPU otherwise. Anything else names the device (``"cpu"``, ``"cuda"``, ``"cuda:1"``);
    asking for a GPU where there is none is a ConfigError rather than a crash later."""
    import torch

    if preference in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={preference!r} is not a device; choose auto, cpu, cuda or cuda:<index>") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={preference}: no CUDA GPU is available here; use device=cpu (or auto)")
    return device
