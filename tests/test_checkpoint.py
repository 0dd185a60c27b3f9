"""Checkpoint round trip and the errors for corrupt or mismatched files."""

import pytest
import torch

from susc_core.model.checkpoint import (CheckpointError, load_model, load_training_state, save_model,
                                        save_training_state)
from susc_core.model.transformer import ModelConfig, init_params

CFG = ModelConfig(n_layers=1, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16)


def test_round_trip_is_bitwise(tmp_path):
    params = init_params(CFG, torch.Generator().manual_seed(3))
    save_model(tmp_path / "m.safetensors", CFG, params)
    cfg, loaded = load_model(tmp_path / "m.safetensors", expected=CFG)
    assert cfg == CFG
    assert all(torch.equal(params[k], loaded[k]) for k in params)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, CFG, init_params(CFG, torch.Generator().manual_seed(0)))
    path.write_bytes(path.read_bytes()[:200])  # truncated download / disk error
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)


def test_config_mismatch_lists_fields(tmp_path):
    save_model(tmp_path / "m.safetensors", CFG, init_params(CFG, torch.Generator().manual_seed(0)))
    other = ModelConfig(**{**CFG.to_dict(), "n_heads": 4})
    with pytest.raises(CheckpointError, match="n_heads"):
        load_model(tmp_path / "m.safetensors", expected=other)


def test_missing_and_nonfinite_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    save_model(tmp_path / "inside.safetensors", CFG, init_params(CFG, torch.Generator().manual_seed(0)))
    with pytest.raises(CheckpointError, match=r"is a directory; .*inside\.safetensors"):
        load_model(tmp_path)
    params = init_params(CFG, torch.Generator().manual_seed(0))
    params["unembed.b_U"][3] = float("nan")
    save_model(tmp_path / "nan.safetensors", CFG, params)
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(tmp_path / "nan.safetensors")


def test_training_state_loads_weights_only(tmp_path):
    state = {"step": 7, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}, "numpy_rng": "{}"}
    save_training_state(tmp_path / "s.pt", state)
    back = load_training_state(tmp_path / "s.pt")
    assert back["step"] == 7 and torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    (tmp_path / "s.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="delete it"):
        load_training_state(tmp_path / "s.pt")


def test_a_checkpoint_with_a_retired_speed_setting_still_loads(tmp_path):
    """Checkpoints written before loss_chunk_tokens left ModelConfig (the shipped ones among them) keep it in
    their stored config; loading ignores it."""
    import json

    from safetensors.torch import load_file, save_file

    from susc_core.model.checkpoint import CONFIG_KEY, load_model, read_metadata, save_model
    from susc_core.model.transformer import ModelConfig, init_params

    cfg = ModelConfig(n_layers=1, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16)
    path = tmp_path / "old.safetensors"
    save_model(path, cfg, init_params(cfg, torch.Generator().manual_seed(0)))
    meta = read_metadata(path)
    meta[CONFIG_KEY] = json.dumps({**json.loads(meta[CONFIG_KEY]), "loss_chunk_tokens": 512})
    save_file(load_file(path), path, metadata=meta)
    assert load_model(path, expected=cfg)[0] == cfg
