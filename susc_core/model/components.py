"""Components by name: which parameter coordinates a restricted SGLD run moves.

Names (``valid_component_names`` lists them for a config):
- ``L{l}H{h}``: attention head h of layer l = its slices ``[h]`` of W_Q, W_K, W_V, W_O, b_Q, b_K, b_V
  (b_O is shared by the layer and belongs to ``L{l}``, as in SCIENCE.md §4);
- ``L{l}``: every parameter of block l (ln1, all heads, b_O, and ln2 + MLP when present);
- ``L{l}.mlp``: the MLP of block l (W_in, b_in, W_out, b_out), only when ``d_mlp > 0``;
- ``embed``: the token embedding W_E only;
- ``pos_embed``: the shortformer positional embedding W_pos, its own component because it never
  enters the residual stream (it is added to every layer's query/key input);
- ``ln_final``: the final LayerNorm; ``unembed``: W_U and b_U; ``full``: every parameter.
Globs (``fnmatch``: ``L1H*``, ``L*H0``) expand in the order of ``valid_component_names``. The grammar is
``parse_name`` (every model family shares it: the adapters name their components the same way).

A component's coordinates, flattened in ``slices`` order, form one vector ``[dim]`` (``gather``);
``scatter`` writes such a vector back into a copy of the parameters, differentiably.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from susc_core.model.transformer import ModelConfig, Params, param_shapes

HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
WHOLE_MODEL_PARTS = ("embed", "pos_embed", "ln_final", "unembed")  # names of whole tensors outside the blocks
FULL = "full"
_LAYER_RE = re.compile(r"^L(?P<layer>\d+)(?:H(?P<head>\d+)|(?P<mlp>\.mlp))?$")


class ComponentName(NamedTuple):
    """A parsed component name: ``kind`` "head" (L{l}H{h}), "block" (L{l}), "mlp" (L{l}.mlp), one of
    ``WHOLE_MODEL_PARTS`` or "full"; ``layer`` and ``head`` where the kind has them."""

    kind: str
    layer: int | None = None
    head: int | None = None


def parse_name(name: str) -> ComponentName:
    """The one grammar of component names (concrete names, not globs); raises ValueError for others."""
    if name in WHOLE_MODEL_PARTS or name == FULL:
        return ComponentName(name)
    if (m := _LAYER_RE.match(name)) is None:
        raise ValueError(f"{name!r} is not a component name: L{{l}}H{{h}}, L{{l}}, L{{l}}.mlp, "
                         f"{', '.join(WHOLE_MODEL_PARTS)} or {FULL}")
    layer = int(m["layer"])
    if m["head"] is not None:
        return ComponentName("head", layer, int(m["head"]))
    return ComponentName("mlp" if m["mlp"] else "block", layer)


def is_head(name: str) -> bool:
    """Whether ``name`` names one attention head (``L{l}H{h}``); False for globs and other names."""
    return _LAYER_RE.match(name) is not None and parse_name(name).kind == "head"


def layer_names(n_layers: int, n_heads: int, has_mlp: bool) -> list[str]:
    """The per-layer component names in canonical order: every head (layer by layer), then each
    block ``L{l}`` followed by its ``L{l}.mlp`` when the model has MLPs."""
    names = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
    for layer in range(n_layers):
        names += [f"L{layer}"] + ([f"L{layer}.mlp"] if has_mlp else [])
    return names


@dataclass(frozen=True)
class Component:
    """One named component.

    slices: (parameter name, head index or None for the whole tensor), in gather order.
    shapes: the shape of each slice. layer: the first block whose computation it changes
    (``n_layers`` when only the final LayerNorm / unembedding change). head: the head index when the
    component is one attention head, else None.
    """

    name: str
    slices: tuple[tuple[str, int | None], ...]
    shapes: tuple[tuple[int, ...], ...]
    layer: int
    head: int | None = None

    @property
    def dim(self) -> int:
        """Number of scalar coordinates the component moves."""
        return sum(math.prod(s) for s in self.shapes)


def valid_component_names(cfg: ModelConfig) -> list[str]:
    """Every concrete component name for ``cfg``, in canonical order."""
    return layer_names(cfg.n_layers, cfg.n_heads, cfg.d_mlp > 0) + [*WHOLE_MODEL_PARTS, FULL]


def resolve_components(cfg: ModelConfig, names: list[str] | tuple[str, ...]) -> list[str]:
    """Expand globs and check names; returns unique concrete names in first-mention order.

    Raises ValueError naming the bad entry and listing the valid names.
    """
    return expand_names(valid_component_names(cfg), names)


def expand_names(valid: list[str], names: list[str] | tuple[str, ...]) -> list[str]:
    """Expand globs (``fnmatch``) and check names against ``valid``; unique names in first-mention order.

    Raises ValueError naming the bad entry and listing the valid names.
    """
    out: list[str] = []
    for name in names:
        matches = fnmatch.filter(valid, name) if any(c in name for c in "*?[") else [n for n in valid if n == name]
        if not matches:
            raise ValueError(f"unknown component {name!r} for this model; valid names: {', '.join(valid)} "
                             f"(globs such as 'L1H*' or 'L*H0' are allowed)")
        out += [m for m in matches if m not in out]
    return out


def component_layer(name: str, n_layers: int) -> int:
    """The first block whose computation component ``name`` (concrete, any model's naming) changes:
    its layer for ``L{l}H{h}``, ``L{l}``, ``L{l}.mlp``; 0 for ``embed``, ``pos_embed``, ``full``;
    ``n_layers`` for ``ln_final`` and ``unembed`` (they change only what follows the last block)."""
    parsed = parse_name(name)
    if parsed.layer is not None:
        return parsed.layer
    return n_layers if parsed.kind in ("ln_final", "unembed") else 0


def component(cfg: ModelConfig, name: str) -> Component:
    """The ``Component`` called ``name`` (a concrete name, not a glob)."""
    resolve_components(cfg, [name])
    shapes = param_shapes(cfg)
    parsed, layer = parse_name(name), component_layer(name, cfg.n_layers)
    if parsed.kind == "head":
        slices = tuple((f"blocks.{layer}.attn.{p}", parsed.head) for p in HEAD_PARAMS)
        return Component(name, slices, tuple(shapes[p][1:] for p, _ in slices), layer, parsed.head)
    prefixes = {FULL: ("",), "mlp": (f"blocks.{layer}.mlp.",), "block": (f"blocks.{layer}.",)}.get(
        parsed.kind, (f"{name}.",))
    slices = tuple((p, None) for p in shapes if p.startswith(prefixes))
    return Component(name, slices, tuple(shapes[p] for p, _ in slices), layer)


def gather(params: Params, comp: Component) -> torch.Tensor:
    """The component's coordinates of ``params`` as one flat vector [dim]."""
    return torch.cat([(params[p] if h is None else params[p][h]).reshape(-1) for p, h in comp.slices])


def unflatten(comp: Component, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split ``w [..., dim]`` into the component's slices ``{param name: [..., *slice shape]}`` (views)."""
    sizes = [math.prod(s) for s in comp.shapes]
    pieces = torch.split(w, sizes, dim=-1)
    lead = w.shape[:-1]
    return {p: piece.reshape(*lead, *shape) for (p, _), piece, shape in zip(comp.slices, pieces, comp.shapes)}


def scatter(params: Params, comp: Component, w: torch.Tensor) -> Params:
    """A new parameter dict equal to ``params`` except the component's coordinates, set to ``w [dim]``.

    Out of place and differentiable in ``w``; tensors outside the component are shared, not copied.
    """
    out = dict(params)
    for (p, h), value in zip(comp.slices, unflatten(comp, w).values()):
        if h is None:
            out[p] = value
        else:
            index = torch.tensor([h], device=w.device)
            out[p] = params[p].index_copy(0, index, value.unsqueeze(0).to(params[p].dtype))
    return out
