"""Device names: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; one parser and one resolver for the library
and the command line."""
from __future__ import annotations

import re

import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(?::\d+)?)$")


class DeviceUnavailable(ValueError):
    """A well-formed device this machine does not have (no CUDA GPU, or not that many)."""


def parse_device(name: str) -> str:
    """``name`` checked: auto, cpu, cuda or cuda:N; ValueError otherwise."""
    text = str(name).strip().lower()
    if not _DEVICE.match(text):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return text


def resolve_device(name: str) -> torch.device:
    """The torch device of ``name``: 'auto' picks CUDA when available. A CUDA device this machine
    lacks is :class:`DeviceUnavailable`; an unknown name a ValueError."""
    text = parse_device(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {text!r} asked for, but no CUDA GPU is available")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {text!r} asked for, but this machine has "
                                    f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(text)


def canonical_device(device: str | torch.device) -> torch.device:
    """``device`` with its index: a bare "cuda" becomes "cuda:<current device>", so "cuda" and "cuda:0"
    name one device (keys of kept logits); other devices are returned as they are."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev
