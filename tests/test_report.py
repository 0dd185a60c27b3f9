"""Run-directory loading, the full analysis on a planted run, and the HTML report (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from susc_core.analysis import AnalysisConfig, analyze
from susc_core.analysis.analyze import class_score_means, standardized_all
from susc_core.analysis.results import FILES, load_run
from susc_core.stats.chain_stats import from_draws
from workflows.outputs import chain_sums_table
from workflows import report_figures as figs
from workflows.report import embedded_json, main, to_analysis_config, write_report

VOCAB = [" the", " cat", "s", "at", " (", ")", "\n", " ", "42", " on", "ly", ",", " sat", "\"", "##"]
HEADS = [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
INDUCTION = ("L1H2", "L1H3")
DELTA_H = 0.1
N_POS = 24
INDUCTION_SHIFT = 1.5


NON_HEADS = ("embed", "L0.mlp", "unembed")  # planted on the uniform mode, the induction mode, noise
NON_HEAD_LAYERS = {"embed": 0, "L0.mlp": 0, "unembed": 2}
N_CHAINS, N_DRAWS = 4, 200
TRACE_RHO = 0.9  # AR(1) coefficient of the planted g traces


def planted_keys(rng: np.random.Generator, n_contexts: int, n_pos: int) -> list[tuple[str, int, int, int]]:
    """(probe, context, position, token id) of two probes: "induction" contexts repeat a random third of
    their tokens three times (induction-pattern tokens from the second copy on), "prose" ones are random."""
    keys = []
    for probe in ("induction", "prose"):
        for context in range(n_contexts):
            ids = (np.resize(rng.integers(0, len(VOCAB), n_pos // 3), n_pos) if probe == "induction"
                   else rng.integers(0, len(VOCAB), n_pos))
            keys += [(probe, context, t, int(i)) for t, i in enumerate(ids)]
    return keys


def planted_chain_sums(components: list[str], rng: np.random.Generator, n_tokens: int) -> pa.Table:
    """chain_sums.parquet through ``outputs.chain_sums_table``: every (component, chain) an AR(1) g trace of
    N_DRAWS draws around a per-component mean; L0H1 chain 2 diverges at draw 40 (its trace stops there). The
    per-token sums are zeros: this run's χ is planted, not estimated from them."""
    stats = {}
    for comp in [*components, "full"]:
        mean, chains = rng.uniform(0.02, 0.1), []
        for k in range(N_CHAINS):
            noise = rng.standard_normal(N_DRAWS) * 0.01
            g = np.empty(N_DRAWS)
            g[0] = mean + noise[0]
            for t in range(1, N_DRAWS):
                g[t] = mean + TRACE_RHO * (g[t - 1] - mean) + noise[t]
            diverged = comp == "L0H1" and k == 2
            chain = from_draws(g[:40] if diverged else g, np.zeros((40 if diverged else N_DRAWS, 1)), 1.0,
                               np.zeros(1), diverged_step=40 if diverged else -1)
            chains.append(chain._replace(sum_a=np.zeros(n_tokens), sum_ga=np.zeros(n_tokens)))
        stats[comp] = chains
    return chain_sums_table(stats, {comp: list(range(N_CHAINS)) for comp in stats})


def write_planted_run(run_dir: Path, with_optional: bool = True, seed: int = 0, n_contexts: int = 6,
                      n_pos: int = N_POS, non_heads: tuple[str, ...] = (), roles: bool = False) -> Path:
    """A run directory whose per-token χ has two planted modes: a uniform mode a(x) on every head
    (variance 9) and an induction mode ±b(x) (+ on INDUCTION, − elsewhere), each column times an
    unknown positive factor, plus 1% noise. b is N(0, 1) plus INDUCTION_SHIFT on the repeated
    copies of the induction probe (induction-pattern tokens), so var b = 1 + shift²·p(1 − p). In
    layer 1 (v sums to 0) the standardised PCA explains 9 / (9 + var b) and var b / (9 + var b);
    layer 0 (v constant) is rank one. ``non_heads`` (of NON_HEADS) add columns: ``embed`` = a(x),
    ``L0.mlp`` = b(x), ``unembed`` = noise, each with noise and a factor. With ``with_optional``: head
    roles (with a measured ``role`` column when ``roles``), ablation deltas and chain sums with g traces."""
    rng = np.random.default_rng(seed)
    keys = planted_keys(rng, n_contexts, n_pos)
    n = len(keys)
    repeated = np.array([p == "induction" and t > n_pos // 3 for p, _, t, _ in keys])
    a, b = 3 * rng.standard_normal(n), rng.standard_normal(n) + INDUCTION_SHIFT * repeated
    v = np.array([1.0 if h in INDUCTION else -1.0 for h in HEADS])
    factor = rng.uniform(0.5, 5.0, len(HEADS))
    chi = (a[:, None] + b[:, None] * v + 0.01 * rng.standard_normal((n, len(HEADS)))) * factor
    modes = {"embed": a, "L0.mlp": b}
    extra = np.column_stack([(modes[c] if c in modes else rng.standard_normal(n)) + 0.1 * rng.standard_normal(n)
                             for c in non_heads]) * rng.uniform(0.5, 5.0, len(non_heads)) if non_heads \
        else np.zeros((n, 0))
    chi, components = np.hstack([chi, extra]), [*HEADS, *non_heads]
    layers = {h: int(h[1]) for h in HEADS} | {c: NON_HEAD_LAYERS[c] for c in non_heads}
    probe, context, position, token_id = map(list, zip(*keys))
    key_cols = {"probe": pa.array(probe), "context_id": pa.array(context, pa.int64()),
                "position": pa.array(position, pa.int32())}
    tokens = pa.table({**key_cols, "token_id": pa.array(token_id, pa.int32()),
                       "token_text": [VOCAB[i] for i in token_id],
                       **{h: chi[:, j] for j, h in enumerate(components)}})
    tokens = tokens.replace_schema_metadata({"components": json.dumps(components), "layers": json.dumps(layers)})
    run_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(tokens, run_dir / FILES["tokens"])
    z = (chi - chi.mean(0)) / chi.std(0)
    probes = np.array(probe)
    response = [{"probe": p, "component": h, "layer": layers[h], "chi": chi[probes == p, j].mean(),
                 "chi_se": 0.1, "chi_std": z[probes == p, j].mean(),
                 "chi_mixture": DELTA_H * chi[probes == p, j].mean(), "n_tokens": int((probes == p).sum())}
                for p in ("induction", "prose") for j, h in enumerate(components)]
    pq.write_table(pa.Table.from_pylist(response), run_dir / FILES["response"])
    diagnostics = [{"component": c, "chain": k, "rhat": 1.01, "ess": 200.0,
                    "diverged": c == "L0H1" and k == 2, "diverged_step": 40 if c == "L0H1" and k == 2 else -1,
                    "llc": 5.0, "mean_g": 0.01} for c in [*components, "full"] for k in range(N_CHAINS)]
    pq.write_table(pa.Table.from_pylist(diagnostics), run_dir / FILES["diagnostics"])
    if with_optional:
        head_roles = [{"component": h, "layer": int(h[1]), "head": int(h[3]),
                       "induction": 0.9 if h in INDUCTION else 0.05, "previous_token": 0.1, "current_token": 0.1,
                       **({"role": "induction" if h in INDUCTION else "multigram"} if roles else {})} for h in HEADS]
        pq.write_table(pa.Table.from_pylist(head_roles), run_dir / FILES["head_roles"])
        ablation = pa.table({**key_cols, **{h: rng.standard_normal(n) for h in HEADS}})
        pq.write_table(ablation, run_dir / FILES["ablation"])
        pq.write_table(planted_chain_sums(components, rng, n), run_dir / FILES["chain_sums"])
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
           "JSON.stringify(window.__errs));document.body.setAttribute('data-load-ms',String(performance.now()))});"
           "</script>")
VIEWER_FIRST = "<style>body{display:flex;flex-direction:column}#viewer-section{order:-1}</style>"  # for the screenshot
CHOSEN = ("L0H0", "L1H2", "PC2 (all)")  # bands a reader ticks in the browser test
BIG_CONTEXTS, BIG_POS = 25, 400  # 2 probes × 25 contexts × 400 positions = 20,000 tokens
MAX_SLOWDOWN = 5.0  # the 20,000-token page may load at most this many times slower than the 288-token one
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="Debian chromium not installed (apt-get install -y chromium)")


def choose_bands(ids: tuple[str, ...]) -> str:
    """A script that ticks exactly the viewer's boxes for ``ids`` and fires a change, as a reader's clicks would."""
    return ("<script>(function(){var want=" + json.dumps(list(ids)) + ";"
            "document.querySelectorAll('#viewer-keys input').forEach(function(b){"
            "b.checked=want.indexOf(b.getAttribute('data-id'))>=0;});"
            "document.getElementById('viewer-keys').dispatchEvent(new Event('change'));})();</script>")


def in_chromium(page: Path, tmp_path: Path, head: str = "", tail: str = "",
                screenshot: Path | None = None) -> tuple[str, str, float]:
    """Open a report in headless Chromium with error capture (plus ``head`` / ``tail`` HTML injected):
    (the DOM after the scripts ran, stderr, ms from navigation to the load event). With ``screenshot``,
    a 1280×1000 PNG of the top of the page is written there too."""
    probe = tmp_path / f"probe_{page.parent.name}.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + CAPTURE + head, 1)
                     .replace("</body>", tail + "</body>", 1), encoding="utf-8")
    shot = [f"--screenshot={screenshot}", "--window-size=1280,1000"] if screenshot else []
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--virtual-time-budget=1000", "--enable-logging=stderr", "--v=0", *shot, "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=180)
    loaded = re.search(r'data-load-ms="([0-9.]+)"', done.stdout)
    return done.stdout, done.stderr, float(loaded.group(1)) if loaded else float("nan")


def assert_no_script_errors(dom: str, stderr: str) -> None:
    assert 'data-errors="[]"' in dom, dom[-2000:]
    assert "Uncaught" not in stderr
    assert 'id="js-errors" hidden' in dom


def png_distinct_bytes(path: Path) -> int:
    """Distinct byte values in a PNG's decompressed pixel rows (a blank page gives a handful)."""
    data, pos, pixels = path.read_bytes(), 8, b""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        pixels += data[pos + 8:pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    return len(set(zlib.decompress(pixels)))


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path, record_property):
    """The whole page renders with no script error: every figure drawn, the viewer's bands for the components
    a reader ticks, and a 20,000-token run (screenshot of its viewer) within MAX_SLOWDOWN of the small run."""
    small = write_report(write_planted_run(tmp_path / "small", non_heads=NON_HEADS, roles=True))
    dom, stderr, small_ms = in_chromium(small, tmp_path, tail=choose_bands(CHOSEN))
    assert_no_script_errors(dom, stderr)
    page = small.read_text()
    n_figures = page.count('class="plotly-graph-div"')
    # variance; loadings, scatter and class bars of each PCA; non-head loadings; heatmap; traces
    assert n_figures == 1 + 3 * 3 + 1 + 1 + 1
    assert dom.count('class="main-svg"') >= n_figures  # plotly drew every figure
    assert 'font-style:italic">induction<' in dom  # the loadings' role labels
    assert dom.count('class="tok"') == N_POS  # the viewer rendered the first context
    assert 'data-bands="3"' in dom and dom.count('class="band"') == N_POS * len(CHOSEN)
    assert dom.count("background: rgb(") == N_POS * len(CHOSEN)  # one coloured band per token and component

    built = time.perf_counter()
    big = write_report(write_planted_run(tmp_path / "big", non_heads=NON_HEADS, roles=True,
                                         n_contexts=BIG_CONTEXTS, n_pos=BIG_POS))
    built = time.perf_counter() - built
    shot = tmp_path / "viewer_20k.png"
    dom, stderr, big_ms = in_chromium(big, tmp_path, head=VIEWER_FIRST, screenshot=shot)
    assert_no_script_errors(dom, stderr)
    cfg = AnalysisConfig().report
    assert load_run(big.parent).tokens.num_rows == 2 * BIG_CONTEXTS * BIG_POS == 20_000
    assert dom.count('class="tok"') == cfg.viewer_page_tokens  # one page of one context, not 20,000 tokens
    assert dom.count('class="band"') == cfg.viewer_page_tokens * cfg.viewer_default_components
    assert png_distinct_bytes(shot) > 16
    numbers = {"render_ms_288_tokens": small_ms, "render_ms_20k_tokens": big_ms, "build_s_20k": round(built, 2),
               "report_bytes_20k": big.stat().st_size, "report_bytes_288": small.stat().st_size,
               "screenshot": str(shot)}
    for key, value in numbers.items():
        record_property(key, value)
    print(numbers)
    assert big_ms <= MAX_SLOWDOWN * small_ms, numbers


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


def test_run_without_heads_still_reports(tmp_path):
    """A study of non-head components only has no head PCA: the checks that need one skip, the non-head section
    carries the analysis, and the viewer opens on the first components."""
    run_dir = write_planted_run(tmp_path / "r", non_heads=NON_HEADS)
    table = pq.read_table(run_dir / FILES["tokens"])
    table = table.drop_columns(HEADS).replace_schema_metadata(
        {"components": json.dumps(NON_HEADS), "layers": json.dumps(NON_HEAD_LAYERS)})
    pq.write_table(table, run_dir / FILES["tokens"])
    page = write_report(run_dir).read_text()
    summary = json.loads((run_dir / "analysis.json").read_text())
    assert summary["pcas"] == {} and summary["non_head"]["pca"]["components"] == list(NON_HEADS)
    assert {c["name"]: c["status"] for c in summary["checks"]}["PC1 uniform mode"] == "skipped"
    assert "The run analyses no attention head" in page and 'id="fig-loadings-non-head"' in page
    run = load_run(run_dir)
    analysis = analyze(run, AnalysisConfig())
    payload = figs.viewer_payload(run, analysis, standardized_all(run, analysis), AnalysisConfig().report)
    assert payload["default"] == list(NON_HEADS)


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


def test_chain_sums_table_records_each_chains_g_trace(tmp_path):
    """chain_sums gains a g_trace list column (the per-draw g of ChainStats); the other columns are unchanged, and
    a run folder returns the traces by component in chain order."""
    rng = np.random.default_rng(0)
    chains = {name: [from_draws(rng.normal(size=6 + k), rng.normal(size=(6 + k, 3)), 1.0, np.zeros(3),
                                diverged_step=2 if k == 1 else -1) for k in range(3)] for name in ("L0H0", "full")}
    table = chain_sums_table(chains, {name: [0, 1, 2] for name in chains})
    assert table.column_names == ["component", "chain", "count", "sum_g", "diverged", "sum_ga", "sum_a", "g_trace"]
    assert table.column("count").to_pylist() == [6, 7, 8, 6, 7, 8]  # sorted components: L0H0, full
    for row, (name, k) in zip(table.to_pylist(), [(n, k) for n in ("L0H0", "full") for k in range(3)]):
        s = chains[name][k]
        assert row["g_trace"] == s.g_trace.tolist() and row["sum_ga"] == s.sum_ga.tolist() and row["sum_g"] == s.sum_g
    run_dir = write_planted_run(tmp_path / "r", with_optional=False)
    pq.write_table(table, run_dir / FILES["chain_sums"])
    traces = load_run(run_dir).g_traces()
    assert list(traces) == ["L0H0", "full"] and [t.chain for t in traces["full"]] == [0, 1, 2]
    assert [t.diverged for t in traces["L0H0"]] == [False, True, False]
    np.testing.assert_array_equal(traces["full"][2].g, chains["full"][2].g_trace)


@pytest.mark.parametrize("recorded", [True, False])
def test_report_traces_beside_diagnostics_or_says_not_recorded(tmp_path, recorded):
    """The diagnostics section draws the g traces (one line per chain, a component at a time, thinned to
    report.max_trace_draws); a run folder written before the g_trace column gets a note, not a crash."""
    run_dir = write_planted_run(tmp_path / "r")
    if not recorded:
        table = pq.read_table(run_dir / FILES["chain_sums"])
        pq.write_table(table.drop_columns(["g_trace"]), run_dir / FILES["chain_sums"])
        assert load_run(run_dir).g_traces() is None
    page = write_report(run_dir, {"report": {"max_trace_draws": 50}}).read_text()
    diagnostics = page[page.index("id='diagnostics'"):page.index('id="viewer-section"')]
    assert ('id="fig-traces"' in diagnostics) == recorded
    assert ("SGLD traces are not recorded in this run folder" in diagnostics) == (not recorded)
    if recorded:
        traces = load_run(run_dir).g_traces()
        fig = figs.trace_figure(traces, {}, 50)
        assert len(fig.data) == sum(len(v) for v in traces.values()) == (len(HEADS) + 1) * N_CHAINS
        assert max(len(t.x) for t in fig.data) == 50 and fig.data[0].x[1] - fig.data[0].x[0] == N_DRAWS // 50
        assert [t.visible for t in fig.data].count(True) == N_CHAINS  # one component shown at a time
        assert sum("(left out)" in t.name for t in fig.data) == 1  # L0H1 chain 2 diverged


def test_non_head_components_are_analysed_apart(tmp_path):
    """embed, L0.mlp and unembed stay out of the head PCAs (which are exactly those of the heads-only run) and are
    set against the heads' modes: embed (planted on the uniform mode) correlates with the heads' PC1, L0.mlp
    (planted on the induction mode) with their PC2, unembed (noise) with neither."""
    heads_only = analyze(load_run(write_planted_run(tmp_path / "heads")), AnalysisConfig())
    run_dir = write_planted_run(tmp_path / "all", non_heads=NON_HEADS)
    analysis = analyze(load_run(run_dir), AnalysisConfig())
    assert set(analysis.pcas) == set(heads_only.pcas) == {"L0", "L1", "all"}
    for key, res in analysis.pcas.items():
        assert res.components == heads_only.pcas[key].components
        np.testing.assert_allclose(res.variance_explained, heads_only.pcas[key].variance_explained, atol=1e-12)
    nh = analysis.non_head
    assert nh.components == NON_HEADS and nh.pca is not None and nh.pca.components == NON_HEADS
    r = {row["component"]: row for row in nh.head_mode_r}
    assert abs(r["embed"]["r with heads' PC1"]) > 0.9 and abs(r["L0.mlp"]["r with heads' PC2"]) > 0.9
    assert max(abs(r["unembed"][f"r with heads' PC{k}"]) for k in (1, 2, 3)) < 0.2
    page = write_report(run_dir).read_text()
    assert "id='non-head'" in page and 'id="fig-loadings-non-head"' in page
    assert json.loads((run_dir / "analysis.json").read_text())["non_head"]["components"] == list(NON_HEADS)


def test_replication_reads_head_columns_with_non_heads_present(tmp_path):
    """The replication rows take each head PCA's columns by name from the standardised matrix, which also holds
    the non-head components (listed first here): the planted induction heads still separate on PC2 (AUC 1)."""
    run_dir = write_planted_run(tmp_path / "r", non_heads=NON_HEADS)
    table = pq.read_table(run_dir / FILES["tokens"])
    meta = table.schema.metadata | {b"components": json.dumps([*NON_HEADS, *HEADS]).encode()}
    pq.write_table(table.replace_schema_metadata(meta), run_dir / FILES["tokens"])
    n, rng = table.num_rows, np.random.default_rng(1)
    comps = [*HEADS, *NON_HEADS, "full"]
    stats = {c: [from_draws(rng.normal(size=8), rng.normal(size=(8, n)), 1.0, np.zeros(n)) for _ in range(N_CHAINS)]
             for c in comps}
    pq.write_table(chain_sums_table(stats, {c: list(range(N_CHAINS)) for c in comps}), run_dir / FILES["chain_sums"])
    cfg = to_analysis_config(None, ["replication.enabled=true", "replication.n_bootstrap=2"])
    rows = analyze(load_run(run_dir), cfg).replication
    auc = {r["pca"]: r["ours"] for r in rows if r["figure"].startswith("PC2 AUC, induction heads")}
    assert auc == {"L1": 1.0, "all": 1.0}


@pytest.mark.parametrize("roles", [True, False])
def test_loadings_labelled_with_measured_roles(tmp_path, roles):
    """Each head's loadings bar is labelled with its measured role when head_roles.parquet has a role column;
    without one (adapter models) the heads are unlabelled and the page says so."""
    run = load_run(write_planted_run(tmp_path / "r", roles=roles))
    analysis = analyze(run, AnalysisConfig())
    assert run.roles() == ({h: "induction" if h in INDUCTION else "multigram" for h in HEADS} if roles else {})
    ticks = list(figs.loadings_figure(analysis.pcas["L1"], 3, run.roles()).data[0].x)
    assert ticks == (["L1H0<br><i>multigram</i>", "L1H1<br><i>multigram</i>", "L1H2<br><i>induction</i>",
                      "L1H3<br><i>induction</i>"] if roles else ["L1H0", "L1H1", "L1H2", "L1H3"])
    page = write_report(run.run_dir).read_text()
    assert ("No head roles were measured for this run" in page) == (not roles)


def test_extreme_class_bars_in_report_and_summary(planted):
    """Fig. 3: the induction-pattern tokens crowd the end of the layer-1 PC2 where the induction heads load."""
    page = write_report(planted).read_text()
    assert all(f'id="fig-classes-{key}"' in page for key in ("L0", "L1", "all"))
    shares = json.loads((planted / "analysis.json").read_text())["extreme_classes"]["L1"]["PC2"]
    analysis = analyze(load_run(planted), AnalysisConfig())
    end = "high" if analysis.pcas["L1"].loadings[1][2] > 0 else "low"  # the side of L1H2, an induction head
    row = next(r for r in shares if r["class"] == "induction_pattern")
    assert row[end] > row["all"] + 0.3 and row[end] > row["high" if end == "low" else "low"]


def test_viewer_opens_on_the_heads_with_the_largest_pc2_loadings(planted):
    """The bands shown first are the report.viewer_default_components heads with the largest |PC2 loading| over
    all heads; every component and PC score is a choice, each head with its role label."""
    run = load_run(planted)
    analysis = analyze(run, AnalysisConfig())
    payload = figs.viewer_payload(run, analysis, standardized_all(run, analysis), AnalysisConfig().report)
    res = analysis.pcas["all"]
    top = sorted(res.components, key=lambda c: -abs(res.loadings[1][res.components.index(c)]))
    assert payload["default"] == top[:AnalysisConfig().report.viewer_default_components]
    ids = [k["id"] for k in payload["keys"]]
    assert ids[:len(HEADS)] == HEADS and "PC2 (all)" in ids
    assert payload["page"] == AnalysisConfig().report.viewer_page_tokens
