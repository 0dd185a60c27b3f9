import pytest
import torch

from susc_core.model.components import component, gather, resolve_components, scatter, valid_component_names
from susc_core.model.transformer import ModelConfig, init_params

CFG = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16, d_mlp=12)


def test_names_and_globs():
    assert resolve_components(CFG, ["L1H*"]) == ["L1H0", "L1H1"]
    assert resolve_components(CFG, ["L*H0", "L0H0", "full"]) == ["L0H0", "L1H0", "full"]
    assert "L0.mlp" in valid_component_names(CFG)
    assert "L0.mlp" not in valid_component_names(ModelConfig(d_mlp=0))


@pytest.mark.parametrize("bad", ["L2H0", "L0H9", "mlp", "L9*"])
def test_unknown_name_lists_valid_names(bad):
    with pytest.raises(ValueError, match="valid names: L0H0, L0H1"):
        resolve_components(CFG, [bad])


def test_component_dims():
    d, e, h = CFG.d_model, CFG.d_head, CFG.n_heads
    assert component(CFG, "L1H1").dim == 4 * d * e + 3 * e
    assert component(CFG, "L0.mlp").dim == 2 * d * 12 + 12 + d
    assert component(CFG, "L0").dim == 4 * d + 4 * h * d * e + 3 * h * e + d + component(CFG, "L0.mlp").dim
    assert component(CFG, "unembed").dim == d * 16 + 16
    assert component(CFG, "unembed").layer == 2 and component(CFG, "L1H0").layer == 1
    total = sum(p.numel() for p in init_params(CFG, torch.Generator().manual_seed(0)).values())
    assert component(CFG, "full").dim == total


@pytest.mark.parametrize("name", ["L1H0", "L0", "embed", "unembed", "L1.mlp"])
def test_scatter_moves_only_the_component(name):
    params = init_params(CFG, torch.Generator().manual_seed(0))
    comp = component(CFG, name)
    w = gather(params, comp)
    moved = scatter(params, comp, w + 1.0)
    changed = sum(int((moved[k] != params[k]).sum()) for k in params)
    assert changed == comp.dim  # exactly the component's coordinates changed ...
    assert torch.equal(gather(moved, comp), w + 1.0)  # ... to the requested values
    assert all(torch.equal(scatter(params, comp, w)[k], params[k]) for k in params)


def test_head_slices_are_the_head():
    params = init_params(CFG, torch.Generator().manual_seed(0))
    comp = component(CFG, "L1H1")
    moved = scatter(params, comp, gather(params, comp) + 1.0)
    diff = moved["blocks.1.attn.W_Q"] - params["blocks.1.attn.W_Q"]
    assert torch.allclose(diff[1], torch.ones_like(diff[1])) and torch.all(diff[0] == 0.0)
    assert torch.equal(moved["blocks.1.attn.b_O"], params["blocks.1.attn.b_O"])


def test_one_grammar_parses_every_name_and_refuses_the_rest():
    from susc_core.model.components import ComponentName, component_layer, is_head, parse_name

    assert parse_name("L12H3") == ComponentName("head", 12, 3)
    assert parse_name("L2") == ComponentName("block", 2)
    assert parse_name("L0.mlp") == ComponentName("mlp", 0)
    assert parse_name("unembed") == ComponentName("unembed") and parse_name("full") == ComponentName("full")
    for bad in ("L1H", "l1h2", "L1.attn", "LH1", "L1H2.mlp", "mlp", "L1H*"):
        with pytest.raises(ValueError, match="is not a component name"):
            parse_name(bad)
    assert [is_head(n) for n in ("L1H2", "L1", "L1H*", "embed")] == [True, False, False, False]
    # every valid name of a model parses, and its layer is the one its parameters live in
    for name in valid_component_names(CFG)[:-1]:  # all but "full", which spans every block
        layer = component_layer(name, CFG.n_layers)
        blocks = {p.split(".")[1] for p, _ in component(CFG, name).slices if p.startswith("blocks.")}
        assert blocks <= {str(layer)}, name
