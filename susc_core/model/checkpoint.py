"""Model checkpoints: weights as safetensors with the model config in the header metadata, and
training state (optimiser, step, RNG) as a ``torch.load(weights_only=True)``-safe file.

Every failure names the file and what to do about it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from susc_core.model.transformer import ModelConfig, Params, param_shapes

CONFIG_KEY = "susc.model_config"
# keys older checkpoints stored in their config that are no longer part of a model's shape (speed settings)
RETIRED_CONFIG_KEYS = ("loss_chunk_tokens",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or not matching the model config."""


def save_model(path: str | Path, cfg: ModelConfig, params: Params, metadata: dict[str, str] | None = None) -> None:
    """Write fp32 weights and the config (JSON in the safetensors header) to ``path``."""
    meta = {CONFIG_KEY: json.dumps(cfg.to_dict())} | dict(metadata or {})
    tensors = {name: params[name].detach().to("cpu", torch.float32).contiguous() for name in param_shapes(cfg)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (config JSON and provenance strings)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(_corrupt_message(path, err)) from err


def load_model(path: str | Path, expected: ModelConfig | None = None) -> tuple[ModelConfig, Params]:
    """Read a checkpoint written by :func:`save_model`.

    Returns the config stored in the file and the parameters (fp32, CPU). With ``expected`` given,
    a config mismatch is an error listing the differing fields.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; point model.checkpoint at the .safetensors file "
                              f"inside it ({', '.join(p.name for p in sorted(path.glob('*.safetensors'))) or 'none there'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `python -m workflows.train_model` "
                              f"or point model.checkpoint at an existing .safetensors file")
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"checkpoint {path} has no '{CONFIG_KEY}' metadata: it was not written by "
                              f"susc_core.model.checkpoint.save_model; re-save it with save_model(path, cfg, params)")
    try:
        stored = json.loads(meta[CONFIG_KEY])
        cfg = ModelConfig(**{k: v for k, v in stored.items() if k not in RETIRED_CONFIG_KEYS})
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable model config ({err})") from err
    if expected is not None and expected != cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(expected, f.name))
                for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expected, f.name)}
        raise CheckpointError(f"checkpoint {path} was trained with a different model config "
                              f"(field: (checkpoint, requested)) {diff}; choose the matching model config")
    try:
        params = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(_corrupt_message(path, err)) from err
    shapes = param_shapes(cfg)
    if set(params) != set(shapes):
        raise CheckpointError(f"checkpoint {path} holds parameters {sorted(set(params) ^ set(shapes))} "
                              f"that do not match its own config: the file is inconsistent, re-train or re-save it")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(params[name].shape)}, expected {shape}")
        if not torch.isfinite(params[name]).all():
            raise CheckpointError(f"checkpoint {path}: {name} contains NaN or inf; the training run diverged")
    return cfg, params


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (model and data hashes in manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, or of a directory's files (relative name and content hash of each, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files to hash at {path}")
    listing = "\n".join(f"{p.relative_to(path).as_posix()} {file_sha256(p)}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def save_training_state(path: str | Path, state: dict) -> None:
    """Write a resumable training state (tensors, numbers, strings, nested dicts/lists only)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_training_state(path: str | Path) -> dict:
    """Read a state written by :func:`save_training_state` with ``weights_only=True``."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"training state {path} cannot be read ({type(err).__name__}: {err}); "
                              f"delete it to restart training from scratch") from err


def _corrupt_message(path: str | Path, err: Exception) -> str:
    return (f"checkpoint {path} is corrupt or not a safetensors file ({err}); "
            f"restore it (git checkout / re-download) or re-train with `python -m workflows.train_model`")
