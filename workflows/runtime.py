"""Small edge helpers shared by the Hydra apps: device choice, bundled asset paths, logging setup."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent.parent / "susc_core" / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a file bundled in ``susc_core/assets`` (the default model and tokenizer)."""
    return str(ASSETS / name)


def register_resolvers() -> None:
    """``${asset:NAME}`` in configs points at a bundled asset; ``${pid:}`` is this process's id (run folders
    carry it, so that two studies started in the same second never share one). Idempotent."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    return logger
