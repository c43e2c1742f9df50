"""Pretrained weights from local files, and the first convolution adapted to the image's channels.

Nothing is downloaded. :func:`read_state_dict` reads a torchvision state dict
(``torch.save(model.state_dict())``), a timm or training checkpoint (a dict holding
``state_dict`` / ``model``, possibly saved from DistributedDataParallel with ``module.``
prefixes) or a ``.safetensors`` file. :func:`load_weights` loads it and says in one
line which keys did not fit. :func:`adapt_in_channels` gives the first convolution of
any family as many input channels as the images have: pretrained RGB filters are summed
(a grey image then gives the response the RGB network gives to that grey) and shared
across the new channels; without weights the new convolution is freshly initialised.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "load_weights", "adapt_in_channels", "first_conv"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (state dict, checkpoint or safetensors), keys unprefixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (weights are read from local files only)")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ImportError(f'{path}: reading .safetensors needs safetensors: pip install -e ".[timm]"') from None
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load/safetensors raise many types on bad files
        raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, what: str, *, prefix: str = "",
                 ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Load ``path`` into ``model``; keys start with ``prefix`` in the file; ``ignore`` skips keys
    (e.g. the classifier). Raises one ``ValueError`` naming the file and the keys that do not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not ignore(k)}
    unexpected = [prefix + k for k in mine if k not in own]
    missing = [k for k in own if k not in mine]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mine.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: not a {what} state dict (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shapes {wrong[:3]})")
    model.load_state_dict(mine)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """``(path, conv)``: the first ``nn.Conv2d`` of ``model`` (the one that reads the image)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"{type(model).__name__} has no Conv2d to read the image")


def adapt_in_channels(model: nn.Module, in_channels: int, pretrained: bool) -> nn.Module:
    """Replace the first convolution so that it reads ``in_channels`` channels; returns ``model``."""
    path, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise ValueError(f"{path}: a grouped first convolution cannot be adapted to {in_channels} channels")
    new = copy.deepcopy(conv)  # keeps the class (e.g. timm's StdConv2d, Conv2dSame), bias and settings
    new.in_channels = in_channels
    new.weight = nn.Parameter(conv.weight.new_empty(conv.out_channels, in_channels, *conv.kernel_size))
    if pretrained:
        with torch.no_grad():
            summed = conv.weight.sum(dim=1, keepdim=True)
            new.weight.copy_(summed.expand(-1, in_channels, -1, -1) / in_channels)
    else:
        new.reset_parameters()
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model
