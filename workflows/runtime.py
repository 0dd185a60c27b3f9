"""Small edge helpers shared by the Hydra apps: device choice, bundled asset paths, logging setup."""

from __future__ import annotations

import logging
import os
import secrets
import sys
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


def authenticate_local_runtime(token_bytes: int) -> str:
    """Token authentication for a private local Ray runtime: unless ``RAY_AUTH_MODE`` is set already, set
    ``RAY_AUTH_MODE=token`` and a fresh random ``RAY_AUTH_TOKEN`` (``token_bytes`` random bytes) that only
    this process and the runtime it starts inherit. Ray's servers listen on every interface whatever
    address it is given (measured with Ray 2.60), so the token is what keeps other machines out. Must run
    before ``ray`` is imported (Ray reads the mode at import). Returns the mode in force, for the log."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if "ray" in sys.modules:
        get_logger("runtime").warning("ray was imported before the local runtime was configured: it runs without "
                                      "authentication; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN before starting")
        return "disabled"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(token_bytes)
    os.environ["RAY_AUTH_MODE"] = "token"
    return "token (a fresh random token for this run)"
