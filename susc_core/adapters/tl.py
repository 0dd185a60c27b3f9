"""TransformerLens ``HookedTransformer`` models as ``ModelAdapter``s (optional extra ``[tl]``, transformer-lens 3.x;
4.x replaced ``HookedTransformer`` by ``TransformerBridge``).

The layout is already per head: ``L{l}H{h}`` = index ``[h]`` of ``W_Q``, ``W_K``, ``W_V``, ``W_O``,
``b_Q``, ``b_K``, ``b_V`` of ``blocks.{l}.attn`` (``b_O`` is shared by the layer, as in the bundled
model). With grouped-query attention (``n_key_value_heads``) TransformerLens stores ``_W_K``, ``_W_V``,
``_b_K``, ``_b_V`` per KV head; with ``shared_kv=True`` (default) a head then includes the slices of its KV
group ``h // (n_heads / n_key_value_heads)`` (shared with the other heads of the group), as in ``hf``;
with ``shared_kv=False`` they belong to ``L{l}`` only.
Other names: ``L{l}``, ``L{l}.mlp`` (when not attention-only), ``embed``, ``pos_embed`` (learned
positions only), ``ln_final`` (when the model normalises), ``unembed``, ``full``.

On disk (``save_tl`` / ``load_tl``, what ``model.adapter=tl`` reads): a directory holding ``CONFIG_FILE``,
a JSON object of ``HookedTransformerConfig`` keyword arguments, ``WEIGHTS_FILE``, the parameters in
safetensors (never pickle), and optionally ``tokenizer.json`` (a ``tokenizers`` file) for the corpus.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from .base import WHOLE, Mask, ModuleAdapter

CONFIG_FILE = "tl_config.json"  # HookedTransformerConfig keyword arguments
WEIGHTS_FILE = "model.safetensors"  # {parameter name: tensor}
TOKENIZER_FILE = "tokenizer.json"  # optional: the model's tokenizers.Tokenizer
LOAD_TIME_FIELDS = ("device", "dtype", "n_params")  # chosen when loading (or derived), never saved
INSTALL_HINT = "pip install -e '.[tl]'"  # transformer-lens 3.x, pinned in pyproject.toml


class TLAdapter(ModuleAdapter):
    """model: a ``transformer_lens.HookedTransformer`` (read, never modified); loss_chunk_tokens: most token
    rows of vocabulary logits held at once; shared_kv: whether a head of a grouped-query model includes
    its KV group's key/value slices. Build the model yourself, or load one saved by ``save_tl`` (``load_tl``)."""

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int = 2048, shared_kv: bool = True):
        super().__init__(model, loss_chunk_tokens)
        cfg = model.cfg
        self.n_layers, self.n_heads, self.has_mlp = cfg.n_layers, cfg.n_heads, not cfg.attn_only
        self.d_vocab, self.n_ctx, self.shared_kv = cfg.d_vocab, cfg.n_ctx, shared_kv
        self.group_size = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)

    def block_prefix(self, layer: int) -> str:
        return f"blocks.{layer}."

    def mlp_prefix(self, layer: int) -> str:
        return f"blocks.{layer}.mlp."

    def named_masks(self) -> dict[str, Mask]:
        names = [n for n, _ in self.module.named_parameters()]
        out = {}
        for component in ("embed", "pos_embed", "ln_final", "unembed"):
            if owned := [n for n in names if n.startswith(f"{component}.")]:
                out[component] = dict.fromkeys(owned, WHOLE)
        return out

    def head_mask(self, layer: int, head: int) -> Mask:
        p = f"blocks.{layer}.attn"
        params = dict(self.module.named_parameters())
        mask: Mask = {}
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            if f"{p}.{name}" in params:
                mask[f"{p}.{name}"] = head
            elif f"{p}._{name}" in params and self.shared_kv:  # grouped-query attention: one slice per KV head
                mask[f"{p}._{name}"] = head // self.group_size
        return mask

    def final_hidden(self, tokens: torch.Tensor):
        m = self.module
        resid = m(tokens, stop_at_layer=self.n_layers)  # [batch, pos, d_model] before ln_final
        x = m.ln_final(resid) if hasattr(m, "ln_final") else resid
        return x, m.unembed.W_U.T, m.unembed.b_U


def _transformer_lens():
    """The ``transformer_lens`` module, or an error that says how to install the ``[tl]`` extra."""
    try:
        import transformer_lens
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"TransformerLens models need transformer-lens 3.x: {INSTALL_HINT}") from err
    return transformer_lens


def _json_value(name: str, value):
    """A config field's value as plain JSON (numpy scalars become Python numbers); anything else raises."""
    value = value.item() if isinstance(value, np.generic) else value
    try:
        json.dumps(value)
    except TypeError as err:
        raise TypeError(f"HookedTransformerConfig.{name}={value!r} cannot be saved as JSON") from err
    return value


def save_tl(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write a ``HookedTransformer`` as ``load_tl`` reads it: ``CONFIG_FILE`` (the config's fields that differ
    from their defaults, without ``LOAD_TIME_FIELDS``), ``WEIGHTS_FILE`` (every parameter, in its own dtype) and,
    when the model carries a fast tokenizer, ``TOKENIZER_FILE``. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg, kwargs = model.cfg, {}
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, f.name)
        if f.init and f.name not in LOAD_TIME_FIELDS and (default is dataclasses.MISSING or value != default):
            kwargs[f.name] = _json_value(f.name, value)
    (directory / CONFIG_FILE).write_text(json.dumps(kwargs, indent=1, sort_keys=True))
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt"})
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        tokenizer.backend_tokenizer.save(str(directory / TOKENIZER_FILE))
    return directory


def load_tl_config(directory: str | Path):
    """The ``HookedTransformerConfig`` stored in ``directory`` (its ``CONFIG_FILE``; no weight is read), on the
    CPU in fp32, without a hub tokenizer name (nothing is downloaded) or an init seed (weights are loaded)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no TransformerLens config at {path}: a model.adapter=tl checkpoint is a directory "
                                f"with {CONFIG_FILE} and {WEIGHTS_FILE} (write one with susc_core.adapters.tl.save_tl)")
    kwargs = json.loads(path.read_text())
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path} must hold a JSON object of HookedTransformerConfig keyword arguments")
    overrides = dict(device="cpu", dtype=torch.float32, tokenizer_name=None, seed=None, init_weights=False)
    try:
        cfg = _transformer_lens().HookedTransformerConfig(**(kwargs | overrides))
    except TypeError as err:
        raise ValueError(f"{path} is not a valid HookedTransformerConfig: {err}") from err
    if cfg.d_vocab < 1:
        raise ValueError(f"{path} gives no d_vocab (TransformerLens would take it from a hub tokenizer): add "
                         f'"d_vocab": <vocabulary size>')
    return cfg


def check_saved(directory: str | Path):
    """(config, weights path) of a saved model: its config parsed and its weights file present, none read."""
    cfg = load_tl_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}: a model.adapter=tl checkpoint is a directory written by "
                                f"susc_core.adapters.tl.save_tl")
    return cfg, weights


def load_tl(directory: str | Path, loss_chunk_tokens: int = 2048, shared_kv: bool = True) -> TLAdapter:
    """A ``TLAdapter`` for a model saved by ``save_tl`` (or written by hand in that format); the weights must
    name exactly the model's parameters."""
    from safetensors.torch import load_file

    cfg, weights = check_saved(directory)
    model = _transformer_lens().HookedTransformer(cfg)
    state = load_file(weights)
    expected = {n for n, _ in model.named_parameters()}
    if missing := expected - set(state):
        raise ValueError(f"{weights} lacks parameters of the model {CONFIG_FILE} describes: {sorted(missing)}")
    if unexpected := set(state) - expected:
        raise ValueError(f"{weights} holds tensors the model {CONFIG_FILE} describes does not have: "
                         f"{sorted(unexpected)}")
    model.load_state_dict(state, strict=False)  # strict=False: the causal-mask buffers are not saved
    return TLAdapter(model, loss_chunk_tokens, shared_kv)


def load_tl_tokenizer(directory: str | Path):
    """The ``tokenizers.Tokenizer`` for a saved model's corpus: its ``TOKENIZER_FILE`` when present, else the
    bundled tokenizer, when every id of it is a token of the model (vocabulary size <= d_vocab)."""
    from susc_core.data.tokenizer import load_tokenizer

    own = Path(directory) / TOKENIZER_FILE
    if own.is_file():
        return load_tokenizer(own)
    tokenizer, d_vocab = load_tokenizer(), load_tl_config(directory).d_vocab
    if tokenizer.get_vocab_size() > d_vocab:
        raise ValueError(f"{directory} has no {TOKENIZER_FILE}, and the bundled tokenizer's "
                         f"{tokenizer.get_vocab_size()} ids do not fit the model's d_vocab={d_vocab}: put the "
                         f"model's tokenizer (a tokenizers JSON file) at {own}")
    return tokenizer
