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
Globs (``fnmatch``: ``L1H*``, ``L*H0``) expand in the order of ``valid_component_names``.

A component's coordinates, flattened in ``slices`` order, form one vector ``[dim]`` (``gather``);
``scatter`` writes such a vector back into a copy of the parameters, differentiably.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch

from susc_core.model.transformer import ModelConfig, Params, param_shapes

HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")


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
    names = []
    for layer in range(cfg.n_layers):
        names += [f"L{layer}H{h}" for h in range(cfg.n_heads)]
    for layer in range(cfg.n_layers):
        names.append(f"L{layer}")
        if cfg.d_mlp > 0:
            names.append(f"L{layer}.mlp")
    return names + ["embed", "pos_embed", "ln_final", "unembed", "full"]


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
    if (m := HEAD_RE.match(name)) is not None:
        return int(m.group(1))
    if name in ("embed", "pos_embed", "full"):
        return 0
    if name in ("ln_final", "unembed"):
        return n_layers
    return int(name[1:-4] if name.endswith(".mlp") else name[1:])


def component(cfg: ModelConfig, name: str) -> Component:
    """The ``Component`` called ``name`` (a concrete name, not a glob)."""
    resolve_components(cfg, [name])
    shapes = param_shapes(cfg)
    layer = component_layer(name, cfg.n_layers)
    if (m := HEAD_RE.match(name)) is not None:
        slices = tuple((f"blocks.{layer}.attn.{p}", int(m.group(2))) for p in HEAD_PARAMS)
        return Component(name, slices, tuple(shapes[p][1:] for p, _ in slices), layer, int(m.group(2)))
    if name == "full":
        prefixes = ("",)
    elif name in ("embed", "pos_embed", "ln_final", "unembed"):
        prefixes = (f"{name}.",)
    else:
        prefixes = (f"blocks.{layer}.mlp.",) if name.endswith(".mlp") else (f"blocks.{layer}.",)
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
