"""Reading a diffusers model folder: `config.json` and `diffusion_pytorch_model.safetensors`
(read with safetensors' numpy API, no PyTorch) or `diffusion_pytorch_model.bin` (a `torch.save`
file, read by `weights.torch_pickle` without PyTorch).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = ["WeightsError", "read_folder", "WEIGHT_FILES"]

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class WeightsError(ValueError):
    """A weights file or folder that cannot be read or converted; the message names the file or
    the key."""


def read_folder(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, state dict as float numpy arrays) of a diffusers model folder.

    `path` may be relative, a folder holding `config.json` and one of `WEIGHT_FILES`, or such a
    folder's parent with a single model subfolder named by `config.json`'s absence (e.g. `unet/`)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise WeightsError(f"diffusers model folder {path!r} does not exist")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise WeightsError(f"{path!r} has no config.json: expected a diffusers model folder "
                           f"(config.json + {' or '.join(WEIGHT_FILES)}), e.g. the 'unet' "
                           "subfolder of a pipeline")
    with open(cfg_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{cfg_file} is not valid JSON: {e}") from None
    for name in WEIGHT_FILES:
        wfile = os.path.join(path, name)
        if os.path.exists(wfile):
            break
    else:
        raise WeightsError(f"{path!r} holds config.json but no weights file "
                           f"({' or '.join(WEIGHT_FILES)})")
    if wfile.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            state = load_file(wfile)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightsError(f"cannot read {wfile}: {e}") from None
    else:
        from diffusion_jax.weights.torch_pickle import load_state_dict
        state = load_state_dict(wfile)
    return config, {k: np.asarray(v) for k, v in state.items()}
