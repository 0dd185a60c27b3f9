"""The notebook API: one call from a model (in memory or on disk) and tokens (or text) to a study's results.

    from workflows.api import susceptibilities
    result = susceptibilities(model, train=texts, probes={"code": code_texts, "legal": legal_texts},
                              components=["L1H*"], sampler={"n_draws": 100})
    result.response_matrix.to_pandas(); result.pca("L1"); result.report()

It composes the same config as ``python -m workflows.study`` (conf/study.yaml and its defaults, then
``overrides`` in the CLI's grammar) and runs the same ``pipeline.run_study``: the same engine, unit cache,
estimators, diagnostics and run folder. In process by default; ``ray=True`` starts a private local Ray
runtime, ``ray="auto"`` or ``ray="ray://host:port"`` attaches to a cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from susc_core.adapters.base import ModelAdapter
from susc_core.adapters.load import KINDS, AdapterSpec, check_supported, load_adapter, load_adapter_tokenizer
from susc_core.analysis.analyze import Analysis, analyze
from susc_core.analysis.config import AnalysisConfig
from susc_core.analysis.pca import PCAResult
from susc_core.analysis.results import RunResults, load_run
from susc_core.data import tokenizer as bundled_tokenizer
from susc_core.data.corpus import contexts_from_documents, Document
from susc_core.data.tokenizer import encode_documents
from susc_core.engine.seeds import choose_contexts
from susc_core.engine.sgld import SamplerConfig
from susc_core.model.checkpoint import file_sha256, load_model
from susc_core.model.components import valid_component_names
from susc_core.model.transformer import ModelConfig, Params
from workflows.pipeline import run_study
from workflows.runtime import asset_path, get_logger, register_resolvers
from workflows.study_config import StudyConfig, register
from workflows.study_data import StudyInputs, load_inputs

log = get_logger("api")
DEFAULT_MODEL = "default_model.safetensors"  # the bundled model in susc_core/assets
RUN_ROOT = "outputs/api"  # where a call without ``run_dir`` makes its run folder
Tokens = torch.Tensor | Sequence[str]  # token ids [n, L+1], or texts (cut into windows of L+1 tokens)


def study_config(overrides: Sequence[str] = ()) -> StudyConfig:
    """The study config of ``python -m workflows.study`` with ``overrides`` (CLI grammar, e.g.
    ``"sampler=paper"``, ``"units.probe_shards=4"``), composed and validated by Hydra."""
    register()
    register_resolvers()
    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = compose("study", overrides=["run_dir=unset", *overrides])
    return OmegaConf.to_object(cfg)


@dataclass(frozen=True)
class LoadedModel:
    """A model as a study needs it: the bundled model's config and weights, or an adapter (a loadable
    ``AdapterSpec`` or an adapter object); its tokenizer (``tokenizers.Tokenizer``) when one is known."""

    label: str
    hash: str
    component_names: list[str]
    n_layers: int
    n_ctx: int
    tokenizer: Any = None
    model_cfg: ModelConfig | None = None
    w_star: Params | None = None
    adapter: AdapterSpec | ModelAdapter | None = None


def params_sha256(params: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of parameters in name order (names, dtypes, shapes and bytes): the cache key of a model
    built in memory."""
    digest = hashlib.sha256()
    for name in sorted(params):
        value = params[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _backend_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` from a Hugging Face tokenizer (its fast backend) or itself."""
    if tokenizer is None or hasattr(tokenizer, "encode_batch"):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no fast backend: give a tokenizers.Tokenizer or "
                         "a Hugging Face fast tokenizer (character spans of tokens need one)")
    return backend


def _adapter_model(adapter, label: str, tokenizer, spec: AdapterSpec | None = None) -> LoadedModel:
    return LoadedModel(label, params_sha256(adapter.params()), adapter.component_names(), adapter.n_layers,
                       adapter.n_ctx, _backend_tokenizer(tokenizer), adapter=spec or adapter)


def _bundled_model(cfg: ModelConfig, params: Params, digest: str, tokenizer) -> LoadedModel:
    """This project's model with its weights' hash and a tokenizer (the bundled one unless given)."""
    return LoadedModel("bundled", digest, valid_component_names(cfg), cfg.n_layers, cfg.n_ctx,
                       _backend_tokenizer(tokenizer) or bundled_tokenizer.load_tokenizer(), cfg, params)


def path_kind(model: str | Path | None, adapter: str) -> str:
    """How a model given by path loads: "bundled" for None (the bundled model) or a ``.safetensors``
    checkpoint of this project's model, else the adapter kind ``adapter``."""
    return "bundled" if model is None or Path(model).suffix == ".safetensors" else adapter


def load(model=None, tokenizer=None, adapter: str = "hf", loss_chunk_tokens: int = 256) -> LoadedModel:
    """Resolve what a caller passes as ``model``:

    - None: the bundled default model (``susc_core/assets``) with its tokenizer;
    - a path to a ``.safetensors`` checkpoint of this project's model; any other path is a stored model of
      adapter kind ``adapter`` (``susc_core.adapters.load.KINDS``, e.g. a Hugging Face directory or .gguf);
    - ``(ModelConfig, params)``: this project's model in memory;
    - a ``transformer_lens.HookedTransformer`` or a ``transformers`` causal LM object (wrapped in an adapter),
      or any ``ModelAdapter``.
    tokenizer: a ``tokenizers.Tokenizer`` or Hugging Face fast tokenizer; needed only to pass texts (models
    from files and HookedTransformers bring their own). loss_chunk_tokens: vocabulary rows per block (speed)."""
    if model is None or isinstance(model, (str, Path)):
        path = Path(model) if model is not None else Path(asset_path(DEFAULT_MODEL))
        if path_kind(model, adapter) == "bundled":
            return _bundled_model(*load_model(path), file_sha256(path), tokenizer)
        if adapter not in KINDS:
            raise ValueError(f"adapter={adapter!r} cannot load {path}; loadable kinds: {KINDS} (a .safetensors file "
                             "is read as this project's model)")
        spec = AdapterSpec(adapter, str(path), loss_chunk_tokens=loss_chunk_tokens)
        check_supported(spec)
        return _adapter_model(load_adapter(spec), adapter, tokenizer or load_adapter_tokenizer(spec), spec)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], ModelConfig):
        return _bundled_model(*model, params_sha256(model[1]), tokenizer)
    if all(hasattr(model, a) for a in ("per_token_loss", "component_names", "component_mask")):
        return _adapter_model(model, type(model).__name__, tokenizer)
    if type(model).__name__ == "HookedTransformer":
        from susc_core.adapters.tl import TLAdapter

        return _adapter_model(TLAdapter(model, loss_chunk_tokens), "tl", tokenizer or model.tokenizer)
    if hasattr(getattr(model, "config", None), "model_type"):
        from susc_core.adapters.hf import HFAdapter

        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            log.warning("the model uses %s attention, which vmap runs as a slow per-chain loop (5x slower on SmolLM2); "
                        "load it with attn_implementation='eager' or call model.set_attn_implementation('eager')",
                        model.config._attn_implementation)
        return _adapter_model(HFAdapter(model, loss_chunk_tokens), "hf", tokenizer)
    raise TypeError(f"cannot study a {type(model).__name__}: pass None (the bundled model), a checkpoint path, "
                    "(ModelConfig, params), a HookedTransformer, a transformers causal LM or a ModelAdapter")


def _windows(texts: Sequence[str], name: str, model: LoadedModel, n_ctx: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Every window of ``n_ctx + 1`` tokens of ``texts`` (stride n_ctx, ``corpus.cut_contexts``): ids
    [n, n_ctx + 1] and each token's text [n][n_ctx + 1]."""
    if model.tokenizer is None:
        raise ValueError(f"{name} is text but no tokenizer is known for this model: pass tokenizer=, or token ids")
    docs = [Document(f"{name}:{i}", name, "api", text) for i, text in enumerate(texts)]
    contexts = contexts_from_documents(docs, encode_documents(model.tokenizer, texts), n_ctx)
    if not len(contexts.doc_ids):
        raise ValueError(f"{name}: the texts hold no window of {n_ctx + 1} tokens; pass longer texts or set "
                         f"data.seq_len lower (overrides=['data.seq_len=...'])")
    strings = [[texts[int(doc.split(":")[-1])][s:e] for s, e in zip(starts, ends)]
               for doc, starts, ends in zip(contexts.doc_ids, contexts.char_start, contexts.char_end)]
    return torch.from_numpy(contexts.tokens.astype(np.int64)), strings


def _as_tokens(value: Tokens, name: str, model: LoadedModel, n_ctx: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Token ids [n, L+1] and token texts [n][L+1] of ids or texts."""
    if isinstance(value, torch.Tensor):
        ids = value.long()
        if ids.dim() != 2:
            raise ValueError(f"{name} must be token ids [n, L+1] or a list of texts; got a tensor of shape "
                             f"{tuple(ids.shape)}")
        decode = (lambda i: model.tokenizer.decode([i])) if model.tokenizer is not None else str
        vocab = {i: decode(i) for i in torch.unique(ids).tolist()}
        return ids, [[vocab[i] for i in row] for row in ids.tolist()]
    if isinstance(value, str):
        raise ValueError(f"{name} is one string: pass a list of texts (documents)")
    return _windows(list(value), name, model, n_ctx)


def memory_inputs(model: LoadedModel, train: Tokens, probes: Mapping[str, Tokens], cfg: StudyConfig,
                  observables: Tokens | None = None) -> StudyInputs:
    """A study's inputs from tokens or texts in memory. Texts are cut into windows of ``data.seq_len + 1``
    tokens (the model's n_ctx when 0). Without ``observables``, ``data.observable_contexts`` of the training
    windows are the fixed observable contexts (chosen by seed) and the rest the SGLD pool, as in a study."""
    if not probes:
        raise ValueError("probes is empty: give {probe name: token ids or texts}")
    n_ctx = cfg.data.seq_len or model.n_ctx
    base, _ = _as_tokens(train, "train", model, n_ctx)
    if observables is None:
        if cfg.data.observable_contexts >= len(base):
            raise ValueError(f"train holds {len(base)} windows of {n_ctx + 1} tokens, not more than the "
                             f"{cfg.data.observable_contexts} observable contexts taken from it: pass more text, "
                             "observables=, or overrides=['data.observable_contexts=...']")
        obs_rows = choose_contexts(cfg.seed, len(base), cfg.data.observable_contexts, "baseline_observables")
        pool, obs = base[np.setdiff1d(np.arange(len(base)), obs_rows)], base[obs_rows]
    else:
        pool, obs = base, _as_tokens(observables, "observables", model, n_ctx)[0]
    parts = {name: _as_tokens(value, f"probe {name!r}", model, n_ctx) for name, value in probes.items()}
    probe = torch.cat([ids for ids, _ in parts.values()])
    names = [name for name, (ids, _) in parts.items() for _ in range(len(ids))]
    probe_rows = pa.table({"probe": names, "domain": names, "context_id": np.arange(len(names), dtype=np.int64)})
    digest = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in (pool, obs, probe))).hexdigest()
    return StudyInputs(pool, obs, probe, probe_rows, {"model": model.hash, "contexts": digest},
                       model.component_names, model.n_layers, [t for _, texts in parts.values() for t in texts],
                       model.label, model.model_cfg, model.w_star, model.adapter)


@dataclass(frozen=True)
class StudyResult:
    """A finished study: its run folder and summary; tables (pyarrow) load on first use."""

    run_dir: Path
    summary: dict

    @cached_property
    def run(self) -> RunResults:
        return load_run(self.run_dir)

    @property
    def response_matrix(self) -> pa.Table:
        """One row per (probe, component): chi, chi_se, chi_std, chi_mixture, n_tokens."""
        return self.run.response

    @property
    def tokens(self) -> pa.Table:
        """One row per probe token: keys, token text, then χ̂_xy per component."""
        return self.run.tokens

    @property
    def diagnostics(self) -> pa.Table:
        """One row per (component, chain): R-hat, ESS, LLC, divergence and screening flags."""
        return self.run.diagnostics

    def matrix(self, value: str = "chi"):
        """The response matrix as a pandas frame, probes × components, of column ``value``."""
        frame = self.response_matrix.to_pandas()
        return frame.pivot(index="probe", columns="component", values=value)[list(self.run.components)]

    def analysis(self, cfg: AnalysisConfig | None = None) -> Analysis:
        """Standardisation, PCA per layer, token classes and validation checks (``analysis.analyze``)."""
        return analyze(self.run, cfg or AnalysisConfig())

    def pca(self, layer: str = "all", cfg: AnalysisConfig | None = None) -> PCAResult:
        """The PCA of the standardised per-token χ̂ of the heads of ``layer`` ("L0", "L1", ... or "all")."""
        pcas = self.analysis(cfg).pcas
        if layer not in pcas:
            raise KeyError(f"no PCA for {layer!r}; this study has {sorted(pcas)}")
        return pcas[layer]

    def report(self, path: str | Path | None = None, cfg: AnalysisConfig | None = None) -> Path:
        """Write (or rewrite) the HTML report into the run folder, and copy it to ``path`` when given (the
        report is one self-contained file); returns where it is."""
        from workflows.report import write_report

        written = Path(write_report(self.run_dir, cfg))
        if path is None:
            return written
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(written, path))


def _section(value, current, name: str):
    """A config section replaced by a dataclass or updated from a mapping of its fields."""
    if value is None or dataclasses.is_dataclass(value):
        return value or current
    valid = [f.name for f in dataclasses.fields(current)]
    if unknown := sorted(set(value) - set(valid)):
        raise ValueError(f"{name} has no setting(s) {unknown}; valid: {valid}")
    return dataclasses.replace(current, **value)


def susceptibilities(model=None, *, train: Tokens | None = None, probes: Mapping[str, Tokens] | None = None,
                     observables: Tokens | None = None, components: Sequence[str] | None = None,
                     sampler: SamplerConfig | Mapping | None = None, tokenizer=None, seed: int | None = None,
                     device: str | None = None, ray: bool | str = False, run_dir: str | Path | None = None,
                     cache_dir: str | Path | None = None, report: bool = False, adapter: str = "hf",
                     overrides: Sequence[str] = ()) -> StudyResult:
    """Susceptibilities of ``components`` of ``model`` to every probe: the study of ``python -m workflows.study``
    as one call.

    model: see ``load`` (None: the bundled model). train / probes / observables: token ids [n, L+1] or lists
    of texts; without ``train`` and ``probes`` the model and data come from the config, as on the command line
    (the bundled corpus and ``perturbation``). components: names or globs (``L1H*``, ``L0.mlp``, ``embed``);
    default the config's (every head). sampler: a ``SamplerConfig`` or {field: value} over the config's
    (conf/sampler/cpu_default: ε 1e-3, nβ 30, γ 300, 4 chains × 30 draws). ray: False in process; True a
    private local runtime; an address attaches. run_dir: default a new folder under ``outputs/api``;
    cache_dir: the unit cache (a rerun computes only what is missing). overrides: any other setting in the
    CLI's grammar. Returns a ``StudyResult`` over the run folder.
    """
    cluster = "inprocess" if ray is False else "local" if ray is True else "attach"
    cfg = study_config([f"cluster={cluster}", *([f"cluster.address={ray}"] if isinstance(ray, str) else []),
                        *overrides])
    run_dir = Path(run_dir or Path(RUN_ROOT) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:8]}")
    cfg = dataclasses.replace(
        cfg, run_dir=str(run_dir), cache_dir=str(cache_dir or cfg.cache_dir), report=report,
        seed=cfg.seed if seed is None else seed, sampler=_section(sampler, cfg.sampler, "sampler"),
        components=_section(None if components is None else {"names": list(components)}, cfg.components, "components"),
        model=_section(None if device is None else {"device": device}, cfg.model, "model"))
    if (train is None) != (probes is None):
        raise ValueError("give both train and probes (tokens or texts), or neither (the config's corpus)")
    if train is None:
        if not (model is None or isinstance(model, (str, Path))):
            raise ValueError("a model in memory needs train= and probes=: the corpus is tokenised for models "
                             "given by path")
        checkpoint = str(model) if model is not None else cfg.model.checkpoint
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=path_kind(model, adapter),
                                                                 checkpoint=checkpoint))
        inputs = load_inputs(cfg)
    else:
        inputs = memory_inputs(load(model, tokenizer, adapter, cfg.model.loss_chunk_tokens), train, probes, cfg,
                               observables)
    return StudyResult(run_dir, run_study(cfg, inputs))
