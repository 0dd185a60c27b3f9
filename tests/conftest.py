"""Shared fixtures: one local Ray runtime per session, the real configs composed and shrunk for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device of the engine tests (cpu, cuda, cuda:1, ...); CI runs cpu")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the engine tests compute on (``--device``); asking for a missing GPU is an error, not a skip."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"--device {device} asked for, but torch sees no CUDA device (torch {torch.__version__})")
    return device


@pytest.fixture(scope="session")
def ray_session():
    """A private 2-CPU Ray runtime shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
                 logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not (CORPUS / "train.parquet").exists():
        pytest.fail(f"no corpus at {CORPUS}: run scripts/test.sh (it builds it) or `python -m workflows.build_corpus`")
    return CORPUS


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny model over the corpus vocabulary (plumbing tests need no training)."""
    from susc_core.model.checkpoint import save_model
    from susc_core.model.transformer import ModelConfig, init_params

    cfg = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=16, d_vocab=4096)
    params = init_params(cfg, torch.Generator().manual_seed(0))
    params = {k: v * 5 if k.endswith(("W_Q", "W_K", "W_V", "W_O")) else v for k, v in params.items()}
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, cfg, params)
    return path
