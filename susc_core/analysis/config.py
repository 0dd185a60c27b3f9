"""Every rule and threshold of the analysis and the report, as one frozen config tree.

Hydra mirror: ``conf/analysis/default.yaml``. Defaults follow SCIENCE.md §2 and §5; the token-class
definitions there are *unconfirmed*, so every character set and rule order is a field here.
Not frozen so that Hydra can use the classes as structured configs; treat instances as values.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenClassRules:
    """Character sets and rule order of the token-pattern classes (see ``token_classes.py``)."""

    # a token starting with one of these, followed by a letter, starts a word
    word_start_prefixes: list[str] = field(default_factory=lambda: [" "])
    # a stripped token whose LAST char is one of these opens a delimited span: " (", "([", "=["
    left_delimiters: str = "([{<"
    # a stripped token whose FIRST char is one of these closes one: ")", "):", "])"
    right_delimiters: str = ")]}>"
    # symmetric quotes: left if preceded by whitespace or the context start, right otherwise
    quotes: str = "\"'`"
    # a token of whitespace with a newline, or of these chars (plus whitespace), is formatting
    formatting_chars: str = "#*-=_|~"
    # a stripped token made only of these chars (and at least one digit) is numeric
    numeric_chars: str = "0123456789.,"
    # the single label used to colour a token (first class that applies; "other" if none)
    priority: list[str] = field(default_factory=lambda: [
        "induction_pattern", "left_delimiter", "right_delimiter", "numeric", "formatting",
        "spacing", "word_start", "word_end", "word_part",
    ])


@dataclass
class ValidationRules:
    """Thresholds for the checks of ``validation.py``; a failed check is flagged, never fatal."""

    max_rhat: float = 1.1  # a (component, chain) with larger R-hat is flagged
    min_ess: float = 50.0  # per-chain effective sample size below this is flagged
    # PC1 is the "uniform mode" when all its loadings share a sign and it explains at least this
    uniform_mode_min_variance: float = 0.5
    # head-role probe: a head with induction score >= this is an induction head
    induction_head_threshold: float = 0.4
    # PC2 "separates" the induction heads when the rank AUC of their loadings vs the rest,
    # max(AUC, 1 - AUC), reaches this (1.0 = every induction head on one side of every other head)
    separation_min_auc: float = 1.0
    # aggregated per-token vs dataset-level mixture estimate: pass if |slope·δh - 1| <= tol and r >= min_r
    slope_rel_tol: float = 0.5
    slope_min_r: float = 0.8
    # susceptibility vs ablation: the paper finds r ≈ 0; flag |r| above this
    ablation_max_abs_r: float = 0.3


@dataclass
class ReportOptions:
    """Size limits and colours of the HTML report."""

    filename: str = "report.html"
    n_pcs_shown: int = 3  # PCs drawn in the loadings and viewer menus
    max_scatter_points: int = 5000  # token PCA scatter subsamples beyond this (seeded)
    viewer_max_contexts_per_probe: int = 8  # contexts per probe embedded in the token viewer
    viewer_page_tokens: int = 256  # tokens of one context drawn at a time (the viewer pages through longer ones)
    # colour bands shown when the page opens: the heads with the largest |PC2 loading| over all heads
    viewer_default_components: int = 4
    extreme_fraction: float = 0.05  # share of tokens at each end of a PC whose classes are counted (Fig. 3 bars)
    max_trace_draws: int = 1000  # g-trace points drawn per chain (longer traces are thinned evenly)
    heatmap_value: str = "chi_std"  # response_matrix column drawn in the heatmap
    diverging_colorscale: str = "RdBu_r"  # plotly name; negative (expression) blue, positive red


@dataclass
class ReplicationConfig:
    """The replication section (``replication.py``): our figures beside the paper's (SCIENCE.md §5)
    with bootstrap intervals, and the acceptance rules of issue 15 (a missed rule is flagged)."""

    enabled: bool = False  # on in +experiment=replication; needs chain_sums.parquet and head_roles.parquet
    n_bootstrap: int = 200  # resamples of chains (per component, with replacement) and of tokens
    interval: float = 0.9  # central bootstrap interval reported
    # token classes compared on PC2 (the paper: induction-pattern tokens vs word-part tokens)
    pc2_classes: list[str] = field(default_factory=lambda: ["induction_pattern", "word_part"])
    pc3_classes: list[str] = field(default_factory=lambda: ["left_delimiter", "right_delimiter"])
    # the paper's figures (SCIENCE.md §5, §2)
    paper_pc1_variance: dict[str, float] = field(default_factory=lambda: {"L0": 0.95, "L1": 0.99})
    paper_ablation_r: float = 0.0
    paper_slope: float = 9.794
    paper_slope_r: float = 0.958
    # acceptance (issue 15 item 4)
    min_auc: float = 0.9  # PC2 AUC, induction heads vs the other heads (layer 1 or all heads)
    min_auc_lower: float = 0.75  # lower end of its bootstrap interval
    max_abs_ablation_r: float = 0.2  # |mean r| of χ̂ against zero-ablation deltas
    min_rhat_share: float = 0.5  # share of (component, chain) pairs with R-hat <= validation.max_rhat


@dataclass
class AnalysisConfig:
    """Standardisation, PCA, token classes, validation and report settings."""

    standardize: str = "zscore"  # "zscore" (centre, divide by std) or "center" (centre only)
    # tokens sampled per probe before the PCA (0 = all); the paper used 20,000
    max_tokens_per_probe: int = 0
    seed: int = 0  # seeds every subsample (PCA tokens per probe, scatter points)
    token_classes: TokenClassRules = field(default_factory=TokenClassRules)
    validation: ValidationRules = field(default_factory=ValidationRules)
    report: ReportOptions = field(default_factory=ReportOptions)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
