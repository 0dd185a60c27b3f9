"""Hugging Face ``transformers`` causal LMs as ``ModelAdapter``s (optional extra ``[hf]``).

Supported families and what a head component ``L{l}H{h}`` holds (d = d_head, Conv1D/Linear layouts as
stored by transformers):
- GPT-2 (``model_type`` gpt2): the fused ``c_attn`` [d_model, 3·d_model] is sliced per head: the head's
  q, k and v columns and bias entries, plus its rows ``[h·d, (h+1)·d)`` of ``c_proj.weight``
  (``c_proj.bias`` is shared by the layer and belongs to ``L{l}``):
  3·(d_model·d + d) + d·d_model coordinates.
- Llama / Qwen2 / Qwen3 / Mistral (SmolLM2 is a Llama), grouped-query attention with
  ``n_kv_heads`` key/value heads, each SHARED by ``n_heads / n_kv_heads`` query heads: the head's rows
  of ``q_proj`` (and of its bias when present) and its columns of ``o_proj``; with ``shared_kv=True``
  (default) also the k/v rows (and biases) of its KV group ``g = h // (n_heads / n_kv_heads)``. The
  heads of one group then overlap in their k/v coordinates, and a restricted run of ``L3H5`` moves
  keys and values that the other heads of its group also read. ``shared_kv=False`` gives the
  disjoint query/output-only head (k/v then belong to ``L{l}`` only). Per-head norms (Qwen3
  ``q_norm``/``k_norm``) are shared by all heads and belong to ``L{l}``.
Other names: ``L{l}`` (the whole block), ``L{l}.mlp``, ``embed`` (token embedding), ``pos_embed``
(GPT-2's learned positions), ``ln_final``, ``unembed`` (the LM head; with tied embeddings it IS the
embedding matrix, so ``embed`` and ``unembed`` name the same coordinates), ``full``.

Models load from a local directory or a local GGUF file only (``HF_HUB_OFFLINE=1``, no hub download).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .base import Mask, ModuleAdapter

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED = ("gpt2",) + LLAMA_LIKE


def _span(head: int, size: int) -> slice:
    return slice(head * size, (head + 1) * size)


class HFAdapter(ModuleAdapter):
    """A ``transformers`` ``*ForCausalLM`` (GPT-2 or Llama family) as a ``ModelAdapter``.

    model: the loaded model (its weights are read, never modified); loss_chunk_tokens: most token rows
    of vocabulary logits held at once; shared_kv: whether a Llama-family head includes the key/value
    slices of its KV group (see the module docstring). Build the model with
    ``attn_implementation="eager"`` for speed under ``vmap`` (see ``load_hf``).
    """

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int = 2048, shared_kv: bool = True):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"model_type {cfg.model_type!r} is not supported; supported: {SUPPORTED}")
        super().__init__(model, loss_chunk_tokens)
        self.kind = "gpt2" if cfg.model_type == "gpt2" else "llama"
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_vocab, self.n_ctx, self.shared_kv = cfg.vocab_size, cfg.max_position_embeddings, shared_kv
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        names = {n for n, _ in model.named_parameters()}
        self._layers = "transformer.h" if self.kind == "gpt2" else f"{model.base_model_prefix}.layers"
        self._has_bias = {n.rsplit(".", 1)[0] for n in names if n.endswith(".bias")}

    def block_prefix(self, layer: int) -> str:
        return f"{self._layers}.{layer}."

    def mlp_prefix(self, layer: int) -> str:
        return f"{self._layers}.{layer}.mlp."

    def named_params(self) -> dict[str, list[str]]:
        whole = lambda module: [self.name_of(p) for p in module.parameters()]  # noqa: E731
        out = {"embed": whole(self.module.get_input_embeddings())}
        if self.kind == "gpt2":
            out["pos_embed"] = whole(self.decoder.wpe)
        out["ln_final"] = whole(self.decoder.ln_f if self.kind == "gpt2" else self.decoder.norm)
        out["unembed"] = whole(self.lm_head)
        return out

    def head_mask(self, layer: int, head: int) -> Mask:
        p, d = f"{self._layers}.{layer}", self.d_head
        if self.kind == "gpt2":
            width = self.n_heads * d
            cols = torch.cat([torch.arange(width * j + head * d, width * j + (head + 1) * d) for j in range(3)])
            return {f"{p}.attn.c_attn.weight": (slice(None), cols), f"{p}.attn.c_attn.bias": cols,
                    f"{p}.attn.c_proj.weight": _span(head, d)}
        a = f"{p}.self_attn"
        mask: Mask = {f"{a}.q_proj.weight": _span(head, d), f"{a}.o_proj.weight": (slice(None), _span(head, d))}
        if self.shared_kv:
            group = head // (self.n_heads // self.n_kv_heads)
            mask |= {f"{a}.k_proj.weight": _span(group, d), f"{a}.v_proj.weight": _span(group, d)}
        for proj in ("q_proj", "k_proj", "v_proj") if self.shared_kv else ("q_proj",):
            if f"{a}.{proj}" in self._has_bias:
                mask[f"{a}.{proj}.bias"] = mask[f"{a}.{proj}.weight"]
        return mask

    def final_hidden(self, tokens: torch.Tensor):
        x = self.decoder(input_ids=tokens, use_cache=False).last_hidden_state
        return x, self.lm_head.weight, self.lm_head.bias


INSTALL_HINT = "pip install -e '.[hf]'"  # transformers and gguf, pinned in pyproject.toml


def _transformers():
    """The ``transformers`` module, or an error that says how to install the ``[hf]`` extra."""
    try:
        import transformers
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"Hugging Face models need transformers: {INSTALL_HINT}") from err
    return transformers


def _local(path: str | Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) of a locally stored model; hub downloads are switched off."""
    path = Path(path)
    if path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.is_dir() or (gguf_file is not None and not (path / gguf_file).is_file()):
        raise FileNotFoundError(f"no local model at {path / (gguf_file or '')}: give a save_pretrained directory "
                                f"or a .gguf file (hub downloads are disabled)")
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"GGUF models need the gguf package: {INSTALL_HINT}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return path, gguf_file


def load_hf(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
            loss_chunk_tokens: int = 2048, shared_kv: bool = True, attn_implementation: str = "eager") -> HFAdapter:
    """An ``HFAdapter`` for a model stored locally: a ``save_pretrained`` directory, or a GGUF file
    (``path`` the file itself, or its directory with ``gguf_file`` its name; needs ``gguf``).

    Never downloads: sets ``HF_HUB_OFFLINE=1`` and ``local_files_only``. GGUF weights are dequantized
    to ``dtype`` (the fp32 master weights by default). ``attn_implementation`` "eager" because
    ``vmap`` has no batching rule for the fused SDPA kernels and falls back to a slow per-chain loop
    (measured on SmolLM2-135M, CPU, 2 chains x 4 x 32 tokens: 3.6 s eager vs 19 s sdpa per gradient pass).
    """
    transformers = _transformers()
    path, gguf_file = _local(path, gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation)
    return HFAdapter(model, loss_chunk_tokens, shared_kv)


def load_hf_tokenizer(path: str | Path, gguf_file: str | None = None):
    """The ``tokenizers.Tokenizer`` stored with a local model (same ``path`` / ``gguf_file`` as ``load_hf``).

    Only fast tokenizers qualify: they give each token's character span (``tokenizer.encode_documents``).
    """
    transformers = _transformers()
    path, gguf_file = _local(path, gguf_file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer of {path} is not a fast (tokenizers) tokenizer; character spans "
                         f"of tokens need one")
    return tokenizer.backend_tokenizer
