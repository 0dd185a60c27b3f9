"""Standardisation, PCA on planted low-rank matrices, token sampling and the validation checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from susc_core.analysis import ValidationRules
from susc_core.analysis.analyze import sample_rows
from susc_core.analysis.token_classes import extreme_class_shares
from susc_core.analysis.non_head import non_head_analysis
from susc_core.analysis.pca import PCAResult, layer_groups, pca, pca_by_layer, split_heads
from susc_core.analysis.standardize import finite_components, standardize
from susc_core.analysis import validation

RULES = ValidationRules()


def planted_low_rank(n: int, loadings: np.ndarray, strengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """Z = U · diag(strengths) · loadings with U [n, k] orthonormal and column-centred."""
    g = np.random.default_rng(seed).standard_normal((n, len(strengths)))
    u, _ = np.linalg.qr(g - g.mean(axis=0))
    return u @ np.diag(strengths) @ loadings


def test_zscore_removes_the_per_component_factor():
    rng = np.random.default_rng(1)
    chi = rng.standard_normal((50, 4)) + rng.standard_normal(4)
    z, st = standardize(chi)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1.0)
    z_scaled, _ = standardize(chi * np.array([0.1, 2.0, 30.0, 7.0]))  # the Z_full/Z_C factor
    np.testing.assert_allclose(z_scaled, z, atol=1e-12)
    np.testing.assert_allclose(st.center, chi.mean(axis=0))
    centred, st_c = standardize(chi, "center")
    np.testing.assert_allclose(centred, chi - chi.mean(axis=0))
    np.testing.assert_array_equal(st_c.scale, 1.0)


def test_standardize_errors_name_components():
    chi = np.ones((5, 3))
    chi[:, 1] = np.arange(5)
    with pytest.raises(ValueError, match=r"\['a', 'c'\] are constant"):
        standardize(chi, components=["a", "b", "c"])
    chi[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite .* \['a'\]"):
        standardize(chi, components=["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown standardize method"):
        standardize(chi, "minmax")
    assert finite_components(chi, ["a", "b", "c"]) == (["b"], ["a", "c"])


def test_pca_recovers_planted_modes_exactly():
    v = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5], [0.5, -0.5, 0.5, -0.5]])
    s = np.array([10.0, 3.0, 1.0])
    z = planted_low_rank(400, -v, s)  # planted with PC1 all negative: the sign convention flips it
    res = pca(z, ["a", "b", "c", "d"])
    np.testing.assert_allclose(res.variance_explained[:3], s**2 / (s**2).sum(), atol=1e-12)
    np.testing.assert_allclose(res.singular_values[:3], s, atol=1e-10)
    np.testing.assert_allclose(res.loadings[0], v[0], atol=1e-10)  # positive after the flip
    for k in (1, 2):  # sum of loadings 0: the largest |loading| is made positive; same axis anyway
        np.testing.assert_allclose(np.abs(res.loadings[k] @ v[k]), 1.0, atol=1e-10)
    np.testing.assert_allclose(res.scores, z @ res.loadings.T, atol=1e-10)
    np.testing.assert_allclose(res.data_couplings @ np.diag(res.singular_values) @ res.loadings, z,
                               atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(res.data_couplings[:, :3], axis=0), 1.0)


def test_pca_requires_centred_input():
    with pytest.raises(ValueError, match="column-centred"):
        pca(np.ones((10, 2)) + np.arange(10)[:, None], ["a", "b"])
    with pytest.raises(ValueError, match="one column per component"):
        pca(np.zeros((10, 2)), ["a"])


def test_pca_by_layer_equals_pca_of_each_layer_block():
    layers = {"L0H0": 0, "L0H1": 0, "L1H0": 1, "L1H1": 1, "L1H2": 1, "L2H0": 2}
    comps = list(layers)
    assert layer_groups(comps, layers) == {"L0": comps[:2], "L1": comps[2:5], "all": comps}
    z, _ = standardize(np.random.default_rng(2).standard_normal((30, 6)))
    out = pca_by_layer(z, comps, layers)
    np.testing.assert_allclose(out["L1"].loadings, pca(z[:, 2:5], comps[2:5]).loadings)
    np.testing.assert_allclose(out["all"].variance_explained, pca(z, comps).variance_explained)
    with pytest.raises(ValueError, match=r"no layer index for components \['X'\]"):
        layer_groups(["X"], layers)


def test_head_pcas_leave_non_head_components_out():
    """Embeddings, MLPs, whole blocks and the unembedding never enter a head PCA; with no head there is none."""
    layers = {"embed": 0, "L0H0": 0, "L0.mlp": 0, "L0H1": 0, "L0": 0, "L1H0": 1, "L1H1": 1, "unembed": 2,
              "pos_embed": 0}
    comps = list(layers)
    assert split_heads(comps) == (["L0H0", "L0H1", "L1H0", "L1H1"], ["embed", "L0.mlp", "L0", "unembed", "pos_embed"])
    assert layer_groups(comps, layers) == {"L0": ["L0H0", "L0H1"], "L1": ["L1H0", "L1H1"],
                                           "all": ["L0H0", "L0H1", "L1H0", "L1H1"]}
    assert layer_groups(["embed", "unembed"], layers) == {}
    z, _ = standardize(np.random.default_rng(3).standard_normal((40, len(comps))))
    heads = [comps.index(c) for c in ("L0H0", "L0H1", "L1H0", "L1H1")]
    np.testing.assert_allclose(pca_by_layer(z, comps, layers)["all"].loadings,
                               pca(z[:, heads], split_heads(comps)[0]).loadings)
    assert validation.uniform_mode({}, RULES).status == "skipped"


def test_non_head_analysis_sets_each_against_the_head_modes():
    """A non-head column equal to the heads' first mode has r = ±1 with PC1 and 0 with PC2; one on the second mode
    the reverse; a single non-head component gets no PCA of its own."""
    v = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5]])
    heads = planted_low_rank(300, v, np.array([5.0, 2.0]))
    scores = pca(heads, list("abcd")).scores
    names = ["L0H0", "L0H1", "L1H0", "L1H1", "embed", "L0.mlp"]
    z = np.column_stack([heads, scores[:, 0], scores[:, 1]])
    layers = {c: 0 for c in names} | {"L1H0": 1, "L1H1": 1}
    pcas = pca_by_layer(z, names, layers)
    nh = non_head_analysis(z, names, layers, pcas, n_pcs=2)
    assert nh.components == ("embed", "L0.mlp") and nh.pca is not None
    r = {row["component"]: (row["r with heads' PC1"], row["r with heads' PC2"]) for row in nh.head_mode_r}
    np.testing.assert_allclose(np.abs(r["embed"]), [1.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(np.abs(r["L0.mlp"]), [0.0, 1.0], atol=1e-9)
    alone = non_head_analysis(z[:, :5], names[:5], layers, pcas, n_pcs=2)
    assert alone.pca is None and [row["component"] for row in alone.head_mode_r] == ["embed"]


def test_extreme_class_shares_count_each_end():
    """Fig. 3 data: with 20 tokens scored 0..19 and fraction 0.1, each end holds 2 tokens; a token counts in every
    class it has, and "other" holds the tokens with none."""
    flags = np.zeros((20, 2), dtype=bool)
    flags[18:, 0] = True  # class "a": the two highest tokens
    flags[:10, 1] = True  # class "b": the ten lowest
    flags[0, 0] = True  # the lowest token is both
    rows = {r["class"]: r for r in extreme_class_shares(np.arange(20.0), flags, ("a", "b"), 0.1)}
    assert rows["a"] == {"class": "a", "low": 0.5, "all": 0.15, "high": 1.0}
    assert rows["b"] == {"class": "b", "low": 1.0, "all": 0.5, "high": 0.0}
    assert rows["other"] == {"class": "other", "low": 0.0, "all": 0.4, "high": 0.0}
    one_each = extreme_class_shares(np.arange(3.0), np.zeros((3, 1), dtype=bool), ("a",), 0.01)
    assert one_each == [{"class": "other", "low": 1.0, "all": 1.0, "high": 1.0}]  # each end holds at least 1 token
    with pytest.raises(ValueError, match="extreme_fraction"):
        extreme_class_shares(np.arange(20.0), flags, ("a", "b"), 0.6)


def test_sample_rows_caps_each_probe_deterministically():
    probes = np.array(["a"] * 10 + ["b"] * 3, dtype=object)
    rows = sample_rows(probes, 4, seed=0)
    assert (probes[rows] == "a").sum() == 4 and (probes[rows] == "b").sum() == 3
    np.testing.assert_array_equal(rows, sample_rows(probes, 4, seed=0))
    np.testing.assert_array_equal(sample_rows(probes, 0, seed=0), np.arange(13))


def test_pearson_and_rank_auc_values():
    assert validation.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert validation.pearson_r([1, 2, 3], [1, 0, 1]) == pytest.approx(0.0)
    assert np.isnan(validation.pearson_r([1, 1, 1], [1, 2, 3]))
    assert validation.rank_auc([3, 4], [1, 2]) == 1.0
    assert validation.rank_auc([1, 3], [2, 2]) == 0.5


def token_table(chi: dict[str, np.ndarray], probes: list[str]) -> pa.Table:
    n = len(probes)
    return pa.table({"probe": probes, "context_id": np.zeros(n, np.int64),
                     "position": np.arange(n, dtype=np.int32), **chi})


def test_ablation_correlation_per_head():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(200)
    tokens = token_table({"h0": x, "h1": x}, ["p"] * 200)
    ablation = token_table({"h0": 2 * x + 1, "h1": rng.standard_normal(200)}, ["p"] * 200)
    check = validation.ablation_correlation(tokens, ablation.take(rng.permutation(200)),
                                            ["h0", "h1"], RULES)
    r = {row["component"]: row["r"] for row in check.details}
    assert r["h0"] == pytest.approx(1.0) and abs(r["h1"]) < 0.2
    assert check.status == "flag"  # h0 is perfectly correlated
    assert validation.ablation_correlation(tokens, None, ["h0"], RULES).status == "skipped"


def test_aggregation_slope_is_one_over_delta_h():
    rng = np.random.default_rng(4)
    probes = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    tokens = token_table({"h0": rng.standard_normal(15), "h1": rng.standard_normal(15)}, probes)
    means = tokens.group_by("probe").aggregate([("h0", "mean"), ("h1", "mean")]).to_pylist()
    response = pa.Table.from_pylist([{"probe": m["probe"], "component": h,
                                      "chi_mixture": 0.1 * m[f"{h}_mean"]}
                                     for m in means for h in ("h0", "h1")])
    check = validation.aggregation_slope(tokens, response, ["h0", "h1"], 0.1, RULES)
    assert check.status == "pass" and "slope = 10.000" in check.summary and "r = 1.000" in check.summary
    flagged = validation.aggregation_slope(tokens, response, ["h0", "h1"], 0.5, RULES)
    assert flagged.status == "flag"  # slope 10 is far from 1/0.5
    assert validation.aggregation_slope(tokens, response, ["h0"], None, RULES).status == "skipped"


def fake_pca(components: list[str], loadings: np.ndarray) -> PCAResult:
    k = len(loadings)
    return PCAResult(tuple(components), np.ones(k), np.full(k, 1 / k), loadings, np.zeros((0, k)),
                     np.zeros((0, k)))


def test_pc2_separation_and_uniform_mode():
    comps = ["L1H0", "L1H1", "L1H2", "L1H3"]
    roles = pa.table({"component": comps, "induction": [0.1, 0.9, 0.2, 0.8]})
    split = fake_pca(comps, np.array([[0.5] * 4, [-0.5, 0.5, -0.5, 0.5]]))
    mixed = fake_pca(comps, np.array([[0.5, 0.5, 0.5, -0.5], [0.5, 0.5, -0.5, -0.5]]))
    assert validation.pc2_separation({"L1": split}, roles, RULES).status == "pass"
    assert validation.pc2_separation({"L1": mixed}, roles, RULES).details[0]["auc"] == 0.5
    assert validation.pc2_separation({"L1": mixed}, roles, RULES).status == "flag"
    none = pa.table({"component": comps, "induction": [0.1] * 4})
    assert "max 0.100" in validation.pc2_separation({"L1": split}, none, RULES).summary
    assert validation.uniform_mode({"L1": split}, RULES).status == "pass"
    assert validation.uniform_mode({"L1": mixed}, RULES).status == "flag"


def test_sampler_diagnostics_counts():
    diag = pa.table({"component": ["a", "a", "b", "b"], "chain": [0, 1, 0, 1],
                     "rhat": [1.0, 1.5, 1.0, float("nan")], "ess": [100.0, 100.0, 10.0, 100.0],
                     "diverged": [False, False, False, True]})
    check = validation.sampler_diagnostics(diag, RULES)
    assert check.status == "flag" and len(check.details) == 3
    assert check.summary.startswith("3 of 4 (component, chain) flagged: 1 diverged, 0 unstable, 0 nonstationary, "
                                    "0 llc_outlier, 1 with R-hat")
    assert check.summary.endswith("R-hat undefined (fewer than two kept chains or 4 draws) for 1")
