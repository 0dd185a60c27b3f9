"""The notebook API (``workflows.api.susceptibilities``): the same numbers as the CLI study, in process and
on Ray, for this project's model in memory, a HookedTransformer on texts and a transformers model object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workflows.study as study
from susc_core.model.checkpoint import load_model
from test_study import SMALL, compose_study
from workflows.api import StudyResult, load, params_sha256, susceptibilities
from workflows.study_data import load_inputs

COMPONENTS = ["L0H0", "L1H1", "L0"]
API_SMALL = [o for o in SMALL if not o.startswith(("perturbation", "data.corpus"))]


def _probes(inputs) -> dict[str, torch.Tensor]:
    """The CLI study's probe contexts, grouped by probe in their order."""
    names = inputs.probe_rows.column("probe").to_pylist()
    return {p: inputs.probe[torch.tensor([n == p for n in names])] for p in dict.fromkeys(names)}


@pytest.fixture(scope="module")
def cli_study(tmp_path_factory, tiny_checkpoint, corpus_dir):
    """A CLI study of the tiny model and the inputs it read."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = compose_study(tmp, tiny_checkpoint, corpus_dir, "cluster=inprocess", f"components.names=[{','.join(COMPONENTS)}]")
    study.run(cfg)
    return cfg, load_inputs(cfg), StudyResult(tmp / "run", {})


def _api(tmp_path, model, inputs, **kwargs) -> StudyResult:
    return susceptibilities(model, train=inputs.train, observables=inputs.obs, probes=_probes(inputs),
                            components=COMPONENTS, run_dir=tmp_path / "api", cache_dir=tmp_path / "cache",
                            overrides=API_SMALL, **kwargs)


def _assert_same_chi(a: StudyResult, b: StudyResult) -> None:
    for column in COMPONENTS:
        assert np.array_equal(a.tokens.column(column).to_numpy(), b.tokens.column(column).to_numpy()), column
    for column in ("chi", "chi_se", "chi_mixture"):
        assert np.array_equal(a.response_matrix.column(column).to_numpy(), b.response_matrix.column(column).to_numpy(),
                              equal_nan=True), column


def test_model_in_memory_gives_the_cli_numbers_bitwise(cli_study, tmp_path, tiny_checkpoint):
    cfg, inputs, cli = cli_study
    api = _api(tmp_path, load_model(tiny_checkpoint), inputs)
    _assert_same_chi(api, cli)
    assert api.summary["units_computed"] == api.summary["units_total"] > 0
    assert api.matrix().shape == (len(_probes(inputs)), len(COMPONENTS))
    assert api.diagnostics.num_rows == (len(COMPONENTS) + 1) * cfg.sampler.n_chains  # + the full run's chains
    # a rerun is served from the unit cache, with the same numbers
    again = _api(tmp_path, load_model(tiny_checkpoint), inputs)
    assert again.summary["units_computed"] == 0
    _assert_same_chi(again, cli)


def test_ray_gives_the_in_process_numbers(cli_study, tmp_path, tiny_checkpoint, ray_session):
    _, inputs, cli = cli_study
    _assert_same_chi(_api(tmp_path, tiny_checkpoint, inputs, ray=True), cli)


def test_result_analysis_pca_and_report(cli_study, tmp_path, tiny_checkpoint):
    _, inputs, _ = cli_study
    result = _api(tmp_path, str(tiny_checkpoint), inputs, report=False)
    res = result.pca("all")
    heads = ["L0H0", "L1H1"]
    assert res.scores.shape[0] == len(result.analysis().rows)
    assert set(res.components) <= set(heads)
    with pytest.raises(KeyError, match="no PCA for 'L7'"):
        result.pca("L7")
    path = result.report(tmp_path / "elsewhere" / "study.html")
    assert path == tmp_path / "elsewhere" / "study.html"
    assert path.read_bytes() == (result.run_dir / "report.html").read_bytes() and path.stat().st_size > 10_000


def test_hooked_transformer_on_texts(tmp_path, corpus_dir):
    tl = pytest.importorskip("transformer_lens", reason="the [tl] extra is not installed")
    from susc_core.data.corpus import load_documents
    from susc_core.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    texts = list(load_documents(corpus_dir / "documents.parquet").values())
    torch.manual_seed(0)
    model = tl.HookedTransformer(tl.HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=tokenizer.get_vocab_size(), act_fn="gelu"))
    result = susceptibilities(model, tokenizer=tokenizer, train=texts[:40], probes={"a": texts[40:42], "b": texts[42:44]},
                              components=["L1H*"], run_dir=tmp_path / "tl", cache_dir=tmp_path / "cache",
                              overrides=[o for o in API_SMALL if not o.startswith("data.seq_len")] + ["data.seq_len=8"])
    tokens = result.tokens
    assert list(result.run.components) == ["L1H0", "L1H1"]
    assert set(tokens.column("probe").to_pylist()) == {"a", "b"}
    # each token's text is the slice of its document its ids encode
    texts_by_row = tokens.column("token_text").to_pylist()
    ids = tokens.column("token_id").to_numpy()
    assert all(tokenizer.decode([int(i)]) == t for i, t in zip(ids[:50], texts_by_row[:50]))
    assert np.isfinite(result.matrix().to_numpy()).all()


def test_transformers_model_object_and_its_cache_key(tmp_path, cli_study):
    transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")
    _, inputs, _ = cli_study
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=4096,
                                                                 n_positions=16))
    loaded = load(model)
    assert loaded.label == "hf" and loaded.component_names[:2] == ["L0H0", "L0H1"]
    assert loaded.hash == params_sha256(dict(model.named_parameters()))
    result = susceptibilities(model, train=inputs.train, observables=inputs.obs, probes=_probes(inputs),
                              components=["L1H0"], run_dir=tmp_path / "hf", cache_dir=tmp_path / "cache",
                              overrides=API_SMALL)
    assert np.isfinite(result.tokens.column("L1H0").to_numpy()).all()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[0, 0] += 1.0  # another model: another cache key
    assert load(model).hash != loaded.hash


def test_bad_arguments_say_what_to_fix(cli_study, tmp_path):
    _, inputs, _ = cli_study
    with pytest.raises(ValueError, match=r"sampler has no setting\(s\) \['stepsize'\]; valid: \['step_size'"):
        susceptibilities(train=inputs.train, probes=_probes(inputs), sampler={"stepsize": 1e-3})
    with pytest.raises(ValueError, match="give both train and probes"):
        susceptibilities(train=inputs.train)
    with pytest.raises(TypeError, match="cannot study a list"):
        susceptibilities([1, 2], train=inputs.train, probes=_probes(inputs))
    with pytest.raises(ValueError, match=r"not more than the 4 observable contexts .*data.observable_contexts"):
        susceptibilities(train=inputs.train[:3], probes=_probes(inputs), overrides=API_SMALL)
    with pytest.raises(ValueError, match="pass a list of texts"):
        susceptibilities(train="one long text", probes={"p": ["x"]})
