"""Hugging Face ``transformers`` causal LMs as ``ModelAdapter``s (optional extra ``[hf]``).

Supported families (``FAMILIES``, keyed by ``config.model_type``) and what a head component ``L{l}H{h}``
holds. d = d_head; "rows" are output features of a projection (``nn.Linear`` rows; GPT-2's ``Conv1D``
stores them as columns), "columns" its input features. Every head holds its q/k/v output rows (and
their bias entries) and the input columns ``[h·d, (h+1)·d)`` of the attention output projection; a
bias of the output projection, per-head q/k norms (shared by all heads) and every layer norm belong
to the layer ``L{l}`` only.

==============================  =========================  ======================================================
family (model_type)             q/k/v storage              notes
==============================  =========================  ======================================================
GPT-2 (gpt2)                    fused ``c_attn``, [q;k;v]  ``Conv1D``; learned positions ``pos_embed`` (``wpe``)
GPT-NeoX / Pythia (gpt_neox)    fused ``query_key_value``  rows interleaved per head: ``[n_heads, 3, d]``
                                                           (head h: rows ``[3hd, 3hd+3d)``, q then k then v);
                                                           output ``attention.dense``; untied LM head
Llama, Qwen2, Qwen3, Mistral    ``q_proj``/``k_proj``/     grouped-query attention (below); Qwen3 ``q_norm`` /
(llama qwen2 qwen3 mistral)     ``v_proj``                 ``k_norm`` belong to ``L{l}``
Gemma (gemma, gemma2,           ``q_proj``/``k_proj``/     GQA; the decoder scales embeddings by sqrt(d_model);
gemma3_text)                    ``v_proj``                 LM head tied (``unembed`` = ``embed``); gemma3
                                                           ``q_norm``/``k_norm`` belong to ``L{l}``; final-logit
                                                           soft-capping is refused (``unsupported_reason``)
Phi (phi)                       ``q_proj``/``k_proj``/     q/k/v and output (``dense``) biases; LM head bias is
                                ``v_proj``                 part of ``unembed``; optional q/k layer norms: ``L{l}``
Phi-3 (phi3)                    fused ``qkv_proj``,        rows ``[q: n_heads·d; k: n_kv·d; v: n_kv·d]`` (GQA);
                                [q;k;v]                    MLP fused ``gate_up_proj`` (all of ``L{l}.mlp``)
OPT (opt)                       ``q_proj``/``k_proj``/     biases; output ``out_proj``; MLP is ``fc1`` + ``fc2``;
                                ``v_proj``                 learned positions with offset 2: ``pos_embed`` = rows
                                                           ``[2, 2 + n_ctx)`` (rows 0-1 are never read);
                                                           ``project_in`` is part of ``embed``, ``project_out``
                                                           of ``unembed``; LM head tied
==============================  =========================  ======================================================

Grouped-query attention: ``n_kv_heads`` key/value heads, each SHARED by ``n_heads / n_kv_heads`` query
heads. With ``shared_kv=True`` (default) a head also holds the k/v rows (and biases) of its KV group
``g = h // (n_heads / n_kv_heads)``: the heads of one group then overlap in those coordinates, and a
restricted run of ``L3H5`` moves keys and values that the other heads of its group also read. With
``shared_kv=False`` a head of a grouped model holds only its q rows and output columns (k/v then
belong to ``L{l}`` only), and the heads of a layer are disjoint. Without grouping (n_kv_heads =
n_heads) every head holds its own k/v rows either way.

Head coordinates: (3 if it holds k/v else 1)·(d_model·d + b·d) + d·d_model, b = 1 when q/k/v have biases.
Other names: ``L{l}`` (the whole block), ``L{l}.mlp``, ``embed`` (token embedding), ``pos_embed`` (learned
positions: GPT-2, OPT), ``ln_final`` (the final norm, when the model has one), ``unembed`` (the LM head; with
tied embeddings it IS the embedding matrix, so ``embed`` and ``unembed`` name the same coordinates), ``full``.

Models load from a local directory or a local GGUF file only (``HF_HUB_OFFLINE=1``, no hub download).
``check_config`` refuses an unsupported model from its config alone (``load.check_supported``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import WHOLE, Mask, ModuleAdapter

SEPARATE, CONCAT, INTERLEAVED = "separate", "concat", "interleaved"  # how q/k/v projections are stored


@dataclass(frozen=True)
class Layout:
    """Where one family keeps its parts: module paths from the ``*ForCausalLM`` root (``{l}`` = layer)."""

    block: str  # block l, e.g. "model.layers.{l}"
    attn: str = "self_attn"  # the attention module inside a block
    qkv: str = SEPARATE  # SEPARATE q_proj/k_proj/v_proj, or one fused projection: CONCAT [q; k; v] or
    # INTERLEAVED [n_heads, 3, d] on its output rows
    fused: str | None = None  # the fused projection's name inside attn (CONCAT, INTERLEAVED)
    out: str = "o_proj"  # the attention output projection inside attn
    conv1d: bool = False  # GPT-2's Conv1D: weights stored [in, out] (transposed from nn.Linear)
    mlp: tuple[str, ...] = ("mlp",)  # the MLP's modules inside a block
    final_norm: str = "model.norm"  # the final norm (absent in some models: OPT-350m)
    pos_embed: str | None = None  # learned position embedding, when the family has one
    pos_offset: int = 0  # rows of pos_embed before the row of position 0 (OPT: 2)
    embed_extra: tuple[str, ...] = ()  # modules that belong to ``embed`` beside the token embedding
    unembed_extra: tuple[str, ...] = ()  # modules that belong to ``unembed`` beside the LM head
    refused_if_set: tuple[str, ...] = ()  # config keys whose non-None value we cannot compute


_LLAMA = Layout(block="model.layers.{l}")
_GEMMA = Layout(block="model.layers.{l}", refused_if_set=("final_logit_softcapping",))
FAMILIES: dict[str, Layout] = {
    "gpt2": Layout(block="transformer.h.{l}", attn="attn", qkv=CONCAT, fused="c_attn", out="c_proj", conv1d=True,
                   final_norm="transformer.ln_f", pos_embed="transformer.wpe"),
    "gpt_neox": Layout(block="gpt_neox.layers.{l}", attn="attention", qkv=INTERLEAVED, fused="query_key_value",
                       out="dense", final_norm="gpt_neox.final_layer_norm"),
    "llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "mistral": _LLAMA,
    "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "phi": Layout(block="model.layers.{l}", out="dense", final_norm="model.final_layernorm"),
    "phi3": Layout(block="model.layers.{l}", qkv=CONCAT, fused="qkv_proj"),
    "opt": Layout(block="model.decoder.layers.{l}", out="out_proj", mlp=("fc1", "fc2"),
                  final_norm="model.decoder.final_layer_norm", pos_embed="model.decoder.embed_positions",
                  pos_offset=2, embed_extra=("model.decoder.project_in",),
                  unembed_extra=("model.decoder.project_out",)),
}
SUPPORTED = tuple(FAMILIES)


def unsupported_reason(config) -> str | None:
    """Why ``HFAdapter`` cannot run a model with this ``transformers`` config, or None when it can."""
    layout = FAMILIES.get(config.model_type)
    if layout is None:
        return f"model_type {config.model_type!r} is not supported; supported model types: {', '.join(SUPPORTED)}"
    for key in layout.refused_if_set:
        if (value := getattr(config, key, None)) is not None:
            return (f"model_type {config.model_type!r} with {key}={value} is not supported: the model soft-caps its "
                    f"logits (cap·tanh(logits/cap)) before the softmax, and the adapter's vocabulary NLL "
                    f"(chunked_nll) takes plain linear logits, so its loss would not be the model's; only a "
                    f"config with {key}=None runs")
    return None


def check_config(config) -> None:
    """Raise ``ValueError`` (naming the model type and what is supported) unless ``HFAdapter`` can run it."""
    if (reason := unsupported_reason(config)) is not None:
        raise ValueError(reason)


def _span(head: int, size: int) -> torch.Tensor:
    """Indices ``[head·size, (head+1)·size)``: int64 [size]."""
    return torch.arange(head * size, (head + 1) * size)


class HFAdapter(ModuleAdapter):
    """A ``transformers`` ``*ForCausalLM`` of one of ``FAMILIES`` as a ``ModelAdapter``.

    model: the loaded model (its weights are read, never modified); loss_chunk_tokens: most token rows
    of vocabulary logits held at once; shared_kv: whether a head of a grouped-query model includes the
    key/value rows of its KV group (see the module docstring). Build the model with
    ``attn_implementation="eager"`` for speed under ``vmap`` (see ``load_hf``).
    """

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int = 2048, shared_kv: bool = True):
        cfg = model.config
        check_config(cfg)
        super().__init__(model, loss_chunk_tokens)
        self.layout = FAMILIES[cfg.model_type]
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_vocab, self.n_ctx, self.shared_kv = cfg.vocab_size, cfg.max_position_embeddings, shared_kv
        self.decoder = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        self._has_bias = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n.endswith(".bias")}

    def block_prefix(self, layer: int) -> str:
        return self.layout.block.format(l=layer) + "."

    def mlp_prefix(self, layer: int) -> tuple[str, ...]:
        return tuple(f"{self.block_prefix(layer)}{m}." for m in self.layout.mlp)

    def _module(self, path: str) -> torch.nn.Module | None:
        """The submodule at ``path``, or None when the model has none there (OPT without ``project_in``)."""
        try:
            return self.module.get_submodule(path)
        except AttributeError:
            return None

    def _whole(self, *modules: torch.nn.Module | None) -> Mask:
        """{params() name: WHOLE} of every parameter of the given modules (None skipped; tied names resolved)."""
        return {self.name_of(p): WHOLE for m in modules if m is not None for p in m.parameters()}

    def named_masks(self) -> dict[str, Mask]:
        layout, out = self.layout, {}
        out["embed"] = self._whole(self.module.get_input_embeddings(), *map(self._module, layout.embed_extra))
        if layout.pos_embed is not None:
            out["pos_embed"] = {f"{layout.pos_embed}.weight": slice(layout.pos_offset, None)}
        if norm := self._whole(self._module(layout.final_norm)):
            out["ln_final"] = norm
        out["unembed"] = self._whole(self.lm_head, *map(self._module, layout.unembed_extra))
        return out

    def _qkv_rows(self, head: int, with_kv: bool) -> dict[str, torch.Tensor]:
        """{projection name inside attn: int64 output-row indices} of the head's q (and k/v) features."""
        layout, d = self.layout, self.d_head
        group = head // (self.n_heads // self.n_kv_heads)
        if layout.qkv == SEPARATE:
            return {"q_proj": _span(head, d)} | ({"k_proj": _span(group, d), "v_proj": _span(group, d)} if with_kv
                                                 else {})
        if layout.qkv == INTERLEAVED:  # [n_heads, 3, d]: the head's q, k, v rows are contiguous
            starts = [(3 * head + j) * d for j in range(3 if with_kv else 1)]
        else:  # CONCAT [q: n_heads·d; k: n_kv·d; v: n_kv·d]
            q_width, kv_width = self.n_heads * d, self.n_kv_heads * d
            starts = [head * d] + ([q_width + group * d, q_width + kv_width + group * d] if with_kv else [])
        return {layout.fused: torch.cat([torch.arange(s, s + d) for s in starts])}

    def head_mask(self, layer: int, head: int) -> Mask:
        layout = self.layout
        attn = f"{self.block_prefix(layer)}{layout.attn}"
        with_kv = self.shared_kv or self.n_kv_heads == self.n_heads
        mask: Mask = {}
        for proj, rows in self._qkv_rows(head, with_kv).items():
            mask[f"{attn}.{proj}.weight"] = (WHOLE, rows) if layout.conv1d else rows
            if f"{attn}.{proj}" in self._has_bias:
                mask[f"{attn}.{proj}.bias"] = rows
        columns = _span(head, self.d_head)
        mask[f"{attn}.{layout.out}.weight"] = columns if layout.conv1d else (WHOLE, columns)
        return mask

    def final_hidden(self, tokens: torch.Tensor):
        """tokens [batch, seq] -> (x [batch, seq, d_lm_head], w_u [d_vocab, d_lm_head], b_u [d_vocab] | None): the
        decoder's output after its final norm (and OPT's ``project_out``), the LM head's weight and bias."""
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


def load_hf_config(path: str | Path, gguf_file: str | None = None):
    """The ``transformers`` config of a locally stored model (same ``path`` / ``gguf_file`` as ``load_hf``),
    read without its weights: ``config.json``, or a GGUF file's metadata (its tensors are not read)."""
    transformers = _transformers()
    path, gguf_file = _local(path, gguf_file)
    return transformers.AutoConfig.from_pretrained(path, gguf_file=gguf_file, local_files_only=True)


def load_hf(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
            loss_chunk_tokens: int = 2048, shared_kv: bool = True, attn_implementation: str = "eager") -> HFAdapter:
    """An ``HFAdapter`` for a model stored locally: a ``save_pretrained`` directory, or a GGUF file
    (``path`` the file itself, or its directory with ``gguf_file`` its name; needs ``gguf``).

    Never downloads: sets ``HF_HUB_OFFLINE=1`` and ``local_files_only``. The config is checked
    (``check_config``) before any weight is read. GGUF weights are dequantized to ``dtype`` (the fp32
    master weights by default). ``attn_implementation`` "eager" because ``vmap`` has no batching rule
    for the fused SDPA kernels and falls back to a slow per-chain loop (measured on SmolLM2-135M, CPU,
    2 chains x 4 x 32 tokens: 3.6 s eager vs 19 s sdpa per gradient pass).
    """
    check_config(load_hf_config(path, gguf_file))
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
