"""Run-directory loading, the full analysis on a planted run, and the HTML report (headless Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from susc_core.analysis import AnalysisConfig, analyze
from susc_core.analysis.analyze import class_score_means
from susc_core.analysis.results import FILES, load_run
from workflows.report import embedded_json, main, to_analysis_config, write_report

VOCAB = [" the", " cat", "s", "at", " (", ")", "\n", " ", "42", " on", "ly", ",", " sat", "\"", "##"]
HEADS = [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
INDUCTION = ("L1H2", "L1H3")
DELTA_H = 0.1
N_POS = 24
INDUCTION_SHIFT = 1.5


def write_planted_run(run_dir: Path, with_optional: bool = True, seed: int = 0) -> Path:
    """A run directory whose per-token χ has two planted modes: a uniform mode a(x) on every head
    (variance 9) and an induction mode ±b(x) (+ on INDUCTION, − elsewhere), each column times an
    unknown positive factor, plus 1% noise. b is N(0, 1) plus INDUCTION_SHIFT on the repeated
    copies of the induction probe (induction-pattern tokens), so var b = 1 + shift²·p(1 − p). In
    layer 1 (v sums to 0) the standardised PCA explains 9 / (9 + var b) and var b / (9 + var b);
    layer 0 (v constant) is rank one."""
    rng = np.random.default_rng(seed)
    keys = []
    for probe in ("induction", "prose"):
        for context in range(6):
            ids = (np.tile(rng.integers(0, len(VOCAB), N_POS // 3), 3) if probe == "induction"
                   else rng.integers(0, len(VOCAB), N_POS))
            keys += [(probe, context, t, int(i)) for t, i in enumerate(ids)]
    n = len(keys)
    repeated = np.array([p == "induction" and t > N_POS // 3 for p, _, t, _ in keys])
    a, b = 3 * rng.standard_normal(n), rng.standard_normal(n) + INDUCTION_SHIFT * repeated
    v = np.array([1.0 if h in INDUCTION else -1.0 for h in HEADS])
    factor = rng.uniform(0.5, 5.0, len(HEADS))
    chi = (a[:, None] + b[:, None] * v + 0.01 * rng.standard_normal((n, len(HEADS)))) * factor
    probe, context, position, token_id = map(list, zip(*keys))
    key_cols = {"probe": pa.array(probe), "context_id": pa.array(context, pa.int64()),
                "position": pa.array(position, pa.int32())}
    tokens = pa.table({**key_cols, "token_id": pa.array(token_id, pa.int32()),
                       "token_text": [VOCAB[i] for i in token_id],
                       **{h: chi[:, j] for j, h in enumerate(HEADS)}})
    tokens = tokens.replace_schema_metadata({"components": json.dumps(HEADS),
                                             "layers": json.dumps({h: int(h[1]) for h in HEADS})})
    run_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(tokens, run_dir / FILES["tokens"])
    z = (chi - chi.mean(0)) / chi.std(0)
    probes = np.array(probe)
    response = [{"probe": p, "component": h, "layer": int(h[1]), "chi": chi[probes == p, j].mean(),
                 "chi_se": 0.1, "chi_std": z[probes == p, j].mean(),
                 "chi_mixture": DELTA_H * chi[probes == p, j].mean(), "n_tokens": int((probes == p).sum())}
                for p in ("induction", "prose") for j, h in enumerate(HEADS)]
    pq.write_table(pa.Table.from_pylist(response), run_dir / FILES["response"])
    diagnostics = [{"component": c, "chain": k, "rhat": 1.01, "ess": 200.0,
                    "diverged": c == "L0H1" and k == 2, "diverged_step": 40 if c == "L0H1" and k == 2 else -1,
                    "llc": 5.0, "mean_g": 0.01} for c in [*HEADS, "full"] for k in range(4)]
    pq.write_table(pa.Table.from_pylist(diagnostics), run_dir / FILES["diagnostics"])
    if with_optional:
        roles = [{"component": h, "layer": int(h[1]), "head": int(h[3]),
                  "induction": 0.9 if h in INDUCTION else 0.05, "previous_token": 0.1,
                  "current_token": 0.1} for h in HEADS]
        pq.write_table(pa.Table.from_pylist(roles), run_dir / FILES["head_roles"])
        ablation = pa.table({**key_cols, **{h: rng.standard_normal(n) for h in HEADS}})
        pq.write_table(ablation, run_dir / FILES["ablation"])
    (run_dir / "manifest.json").write_text(json.dumps({"config": {"perturbation": {"delta_h": DELTA_H}}}))
    return run_dir


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_run(tmp_path_factory.mktemp("run"))


def test_load_run_tables_and_helpers(planted):
    run = load_run(planted)
    assert run.components == tuple(HEADS)
    assert run.layers == {h: int(h[1]) for h in HEADS}
    assert run.tokens.num_rows == 2 * 6 * N_POS
    assert run.chi_matrix().shape == (2 * 6 * N_POS, len(HEADS))
    assert run.delta_h == DELTA_H
    assert list(run.to_pandas("response").columns[:3]) == ["probe", "component", "layer"]
    with pytest.raises(KeyError, match="unknown table"):
        run.table("nope")


def test_load_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="token_susceptibilities.parquet"):
        load_run(tmp_path)
    run_dir = write_planted_run(tmp_path / "r", with_optional=False)
    assert load_run(run_dir).ablation is None and load_run(run_dir).head_roles is None
    table = pq.read_table(run_dir / FILES["tokens"]).replace_schema_metadata({})
    pq.write_table(table, run_dir / FILES["tokens"])
    with pytest.raises(ValueError, match="'components' and 'layers'"):
        load_run(run_dir)


def test_analysis_recovers_the_planted_modes(planted):
    analysis = analyze(load_run(planted), AnalysisConfig())
    assert set(analysis.pcas) == {"L0", "L1", "all"}
    layer1 = analysis.pcas["L1"]
    p = 6 * (N_POS - N_POS // 3 - 1) / (2 * 6 * N_POS)  # share of tokens in repeated copies
    var_b = 1 + INDUCTION_SHIFT**2 * p * (1 - p)
    np.testing.assert_allclose(layer1.variance_explained[:2], [9 / (9 + var_b), var_b / (9 + var_b)],
                               atol=0.03)
    assert (layer1.loadings[0] > 0).all()
    # data side: induction-pattern tokens carry the induction mode, on the induction heads' side
    means = {r["class"]: r["PC2"] for r in class_score_means(analysis, "L1", 2)}
    side = np.sign(layer1.loadings[1][2])  # L1H2, an induction head
    assert side * means["induction_pattern"] > 0.5
    assert side * means["induction_pattern"] > max(side * v for k, v in means.items()
                                                    if k != "induction_pattern")
    assert analysis.pcas["L0"].variance_explained[0] > 0.999
    status = {c.name: c.status for c in analysis.checks}  # L0H1 chain 2 diverged: no pass can be trusted
    assert status == {"PC1 uniform mode": "unreliable", "PC2 separates induction heads": "unreliable",
                      "susceptibility vs zero-ablation": "unreliable",
                      "aggregated per-token vs dataset-level χ": "unreliable", "sampler diagnostics": "flag"}


@pytest.mark.parametrize("flag", [None, "unstable", "nonstationary", "llc_outlier"])
def test_checks_pass_only_when_every_chain_sampled_the_local_posterior(tmp_path, flag):
    run_dir = write_planted_run(tmp_path / "r")
    diagnostics = pq.read_table(run_dir / FILES["diagnostics"]).to_pylist()
    for row in diagnostics:
        row.update(diverged=False, diverged_step=-1, unstable=False, nonstationary=False, llc_outlier=False)
    if flag:
        diagnostics[5][flag] = True
    pq.write_table(pa.Table.from_pylist(diagnostics), run_dir / FILES["diagnostics"])
    status = {c.name: c.status for c in analyze(load_run(run_dir), AnalysisConfig()).checks}
    assert status["PC1 uniform mode"] == ("unreliable" if flag else "pass")
    assert status["sampler diagnostics"] == ("flag" if flag else "pass")


def test_write_report_files_and_skips_without_optional_inputs(tmp_path):
    run_dir = write_planted_run(tmp_path / "r", with_optional=False)
    path = write_report(run_dir, {"report": {"filename": "r.html"}})
    page = path.read_text()
    assert path.name == "r.html" and "negative = expression" in page
    summary = json.loads((run_dir / "analysis.json").read_text())
    skipped = {c["name"]: c["summary"] for c in summary["checks"] if c["status"] == "skipped"}
    assert skipped == {"PC2 separates induction heads": "the run has no head_roles.parquet",
                       "susceptibility vs zero-ablation": "the run has no ablation.parquet"}
    assert "<script src=" not in page and "<link" not in page  # self-contained: nothing fetched


def test_markdown_summary_records_variance_and_loadings(planted):
    write_report(planted)
    text = (planted / "analysis.md").read_text()
    numbers = json.loads((planted / "analysis.json").read_text())["pcas"]["L1"]
    assert f"| L1 | {100 * numbers['variance_explained'][0]:.2f} |" in text
    assert f"| L1H2 | {numbers['loadings'][0][2]:+.3f} | {numbers['loadings'][1][2]:+.3f} |" in text


def test_cli_overrides_and_config_errors(planted, capsys):
    main([str(planted), "report.filename=cli.html", "validation.max_rhat=1.5"])
    assert capsys.readouterr().out.strip().endswith("cli.html")
    assert to_analysis_config(None, ["seed=3"]).seed == 3
    with pytest.raises(Exception, match="max_rht"):
        to_analysis_config(None, ["validation.max_rht=1.5"])


CAPTURE = ("<script>window.__errs=[];var __ce=console.error;console.error=function(){"
           "window.__errs.push([].slice.call(arguments).join(' '));__ce.apply(console,arguments)};"
           "window.addEventListener('error',function(e){window.__errs.push(e.message)});"
           "window.addEventListener('load',function(){document.body.setAttribute('data-errors',"
           "JSON.stringify(window.__errs))});</script>")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(planted, tmp_path):
    page = write_report(planted).read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + CAPTURE, 1), encoding="utf-8")
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--virtual-time-budget=1000",
                           "--enable-logging=stderr", "--v=0", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=60)
    dom = done.stdout
    assert 'data-errors="[]"' in dom, dom[-2000:]
    assert "Uncaught" not in done.stderr
    assert 'id="js-errors" hidden' in dom
    n_figures = page.count('class="plotly-graph-div"')
    assert n_figures == 1 + 3 + 3 + 1  # variance, 3 loadings, 3 scatters, heatmap
    assert dom.count('class="main-svg"') >= n_figures  # plotly drew every figure
    assert dom.count('<span class="tok"') == N_POS  # the viewer rendered the first context
    assert "scale ±" in dom and dom.count("background: rgb(") == N_POS  # coloured tokens


def test_single_component_run_still_reports(tmp_path):
    run_dir = write_planted_run(tmp_path / "r")
    table = pq.read_table(run_dir / FILES["tokens"])
    table = table.drop_columns([h for h in HEADS if h != "L1H2"]).replace_schema_metadata(
        {"components": json.dumps(["L1H2"]), "layers": json.dumps({"L1H2": 1})})
    pq.write_table(table, run_dir / FILES["tokens"])
    write_report(run_dir)
    summary = json.loads((run_dir / "analysis.json").read_text())
    assert list(summary["pcas"]) == ["all"] and summary["pcas"]["all"]["variance_explained"] == [1.0]
    assert {c["name"]: c["status"] for c in summary["checks"]}["PC2 separates induction heads"] == "skipped"


def test_viewer_json_is_embedded_safely_for_any_token_text(tmp_path):
    """Token texts that would end or re-open a <script> element ("</script>", "<!--<script>") reach the
    viewer's JSON intact, and the embedded text holds no "<" at all."""
    hostile = ["</script>", "<!--<script>", "a<b", "\u2028"]
    assert json.loads(embedded_json({"t": hostile})) == {"t": hostile} and "<" not in embedded_json(hostile)
    run_dir = write_planted_run(tmp_path / "r")
    table = pq.read_table(run_dir / FILES["tokens"])
    texts = [hostile[i % len(hostile)] for i in range(table.num_rows)]
    table = table.set_column(table.column_names.index("token_text"), "token_text", pa.array(texts))
    pq.write_table(table, run_dir / FILES["tokens"])
    page = write_report(run_dir).read_text()
    start = page.index('<script type="application/json" id="viewer-data">')
    payload = page[start:page.index("</script>", start)].split(">", 1)[1]
    assert "<" not in payload and "<!--<script>" in json.dumps(json.loads(payload))


@pytest.mark.parametrize("shared", [True, False])
def test_report_flags_shared_minibatches(tmp_path, shared):
    run_dir = write_planted_run(tmp_path / "r")
    (run_dir / "manifest.json").write_text(json.dumps(
        {"config": {"perturbation": {"delta_h": DELTA_H}, "sampler": {"share_minibatches": shared}}}))
    page = write_report(run_dir).read_text()
    assert ("share_minibatches is on" in page) == shared
