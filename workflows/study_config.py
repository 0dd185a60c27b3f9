"""The study's structured config: one dataclass per config group (conf/<group>/), so a wrong key or
type fails at composition, before any work starts, with Hydra naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from susc_core.analysis.config import AnalysisConfig
from susc_core.model.head_roles import CensusRules
from susc_core.engine.sgld import SamplerConfig
from workflows.execute import ClusterConfig

FAMILIES = ("domains", "mixture", "tokens")


@dataclass
class ModelSection:
    """Which trained model to study (conf/model/).

    ``adapter: bundled`` is a checkpoint of this project's model. ``hf`` is a Hugging Face model run
    through ``susc_core.adapters`` (the families of ``adapters.hf.FAMILIES``): ``checkpoint`` is its
    save_pretrained directory or .gguf file, or ``gguf_package`` + ``gguf_file`` name a GGUF shipped in an
    installed package. ``tl`` is a TransformerLens ``HookedTransformer``: ``checkpoint`` is a directory
    written by ``adapters.tl.save_tl`` (``tl_config.json`` + ``model.safetensors``, optionally
    ``tokenizer.json``). The corpus documents are then re-tokenised with the model's own tokenizer
    (``susc_core.data.retokenize``; tl without ``tokenizer.json``: the bundled one).
    """

    checkpoint: str = "${asset:default_model.safetensors}"  # bundled: safetensors; hf: directory or .gguf; tl: dir
    device: str = "auto"  # auto: CUDA when present, else CPU
    adapter: str = "bundled"  # bundled | hf | tl
    gguf_package: str | None = None  # hf: package whose folder holds the GGUF (found, never imported)
    gguf_file: str | None = None  # hf: GGUF file name inside that package (or inside a checkpoint directory)
    gguf_pip: str | None = None  # hf: pip requirement that installs gguf_package (named when it is missing)
    attn_implementation: str = "eager"  # hf: vmap has no batching rule for fused SDPA
    shared_kv: bool = True  # hf, tl GQA: a head holds the k/v rows of its KV group
    loss_chunk_tokens: int = 256  # most token rows of the vocab logits held at once (256 is fastest on CPU)
    cuda_loss_chunk_tokens: int = 65536  # the same on a GPU (bundled model): whole chains per launch
    memory_budget_mib: int | None = None  # adapters: chains per gradient pass sized to fit this


@dataclass
class DataSection:
    """Baseline data q (conf/data/): the SGLD minibatch pool and the fixed observable contexts."""

    corpus_dir: str = "data/corpus"
    sgld_contexts: int = 1024  # training contexts SGLD minibatches are drawn from
    observable_contexts: int = 32  # fixed baseline contexts for L_n(draw) and g = L_n(draw) - L_n(w*)
    seq_len: int = 0  # tokens per context fed to the model (contexts are truncated); 0: the model's n_ctx

    def __post_init__(self):
        for name in ("sgld_contexts", "observable_contexts"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 0 or self.seq_len == 1:
            raise ValueError(f"data.seq_len must be 0 (the model's n_ctx) or >= 2 tokens, got {self.seq_len}")


@dataclass
class ProbeSpec:
    """One probe distribution q': a corpus domain, or a weighted mixture of domains."""

    name: str = ""
    domains: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # mixture weights (empty: equal)


@dataclass
class PerturbationSection:
    """The perturbation family (conf/perturbation/): what the rows of the response matrix are.

    domains: one probe per corpus domain; mixture: weighted mixtures of domains; tokens: single
    tokens in context (each sampled probe token is its own row).
    """

    family: str = "domains"
    probes: list[ProbeSpec] = field(default_factory=list)
    contexts_per_probe: int = 8  # probe contexts per probe (every position is a probe token)
    tokens_per_probe: int = 64  # family=tokens: rows sampled per probe
    delta_h: float = 0.1  # mixture weight of the δh-mixture estimate (it estimates δh·χ)


@dataclass
class ComponentsSection:
    """Components to study (conf/components/); names or globs, e.g. L1H6, L0, L*H*, embed, unembed."""

    names: list[str] = field(default_factory=lambda: ["L*H*"])
    # add the unrestricted run that centres the estimator (SCIENCE.md §2); without it χ̂ is the restricted
    # covariance -Cov_C[g, a] (susc_core.stats.estimators) and there is no ordinary LLC
    include_full: bool = True


@dataclass
class UnitsSection:
    """How the study is split into work units (one Ray task each)."""

    components_per_unit: int = 0  # 0: every component in one unit (best batching on one machine)
    chains_per_unit: int = 1
    probe_shards: int = 1  # the probe tokens split into this many shards (each re-runs the chains)

    def __post_init__(self):
        if self.components_per_unit < 0 or self.chains_per_unit < 0 or self.probe_shards < 1:
            raise ValueError(f"units.components_per_unit and units.chains_per_unit must be >= 0 (0: all in one unit) "
                             f"and units.probe_shards >= 1; got {self.components_per_unit}, {self.chains_per_unit}, "
                             f"{self.probe_shards}")


@dataclass
class DiagnosticsSection:
    """Checks that a chain samples the local posterior (``susc_core.engine.stability``,
    ``susc_core.stats.diagnostics``). A flagged chain fails the study or is left out of every estimate, per
    ``sampler.divergence_policy``, and the analysis checks then read "unreliable"."""

    preflight_iters: int = 10  # power iterations of the curvature pre-flight per component (0: no pre-flight)
    preflight_contexts: int = 4  # training contexts of the pre-flight's minibatch
    preflight_fd_step: float = 1.0e-3  # finite-difference step of its Hessian-vector products (weight units)
    max_stability: float = 2.0  # flag a component with ε(nβλ + γ) above this (contraction needs < 4)
    llc_outlier_rel: float = 2.0  # flag a chain whose LLC is off its siblings' median m by > this × max(|m|, abs)
    llc_outlier_abs: float = 1.0
    max_drift_z: float = 10.0  # flag a chain whose mean g (last half vs second quarter) moved this many SEs
    min_drift_draws: int = 64  # the drift check needs this many draws (shorter traces: heavy-tailed, not checked)

    def __post_init__(self):
        if self.preflight_iters < 0 or self.preflight_contexts < 1 or not self.preflight_fd_step > 0:
            raise ValueError("diagnostics.preflight_iters must be >= 0, preflight_contexts >= 1 and preflight_fd_step "
                             f"> 0; got {self.preflight_iters}, {self.preflight_contexts}, {self.preflight_fd_step}")
        if not (self.max_stability > 0 and self.llc_outlier_rel > 0 and self.max_drift_z > 0
                and self.min_drift_draws >= 16):
            raise ValueError("diagnostics.max_stability, llc_outlier_rel and max_drift_z must be > 0 and "
                             "min_drift_draws >= 16")


@dataclass
class DatasetLevelSection:
    """An independent dataset-level run (SCIENCE.md §2): the same components (and full run) sampled
    again with chains of their own seed, minibatch size and draw count, observed on each probe's held-out
    half-b contexts only. When enabled, the response matrix's δh-mixture estimate ``chi_mixture`` comes
    from these chains, so the check "aggregated per-token (half a, per-token run) vs dataset-level χ,
    slope ≈ 1/δh" compares two independent runs on disjoint data (paper: 200 draws, batch 64)."""

    enabled: bool = False
    seed: int = 1  # root seed of its chains; must differ from the study's seed
    n_draws: int = 200  # draws per chain (paper dataset-level: 200)
    batch_size: int = 64  # SGLD minibatch sequences (paper dataset-level: 64)
    contexts_per_probe: int = 0  # half-b contexts per probe it observes; 0: every half-b context


@dataclass
class HeadRolesSection:
    """Head-role probes written next to the matrix for validation."""

    n_seqs: int = 16  # repeated random sequences
    half_len: int = 50  # tokens before the repeat
    ablation: bool = True  # per-token zero-ablation loss deltas of every head on the probe tokens
    # role census with the multigram measure: ablation on the natural domains' probe contexts of this study
    # vs on the second copy of repeated random tokens
    census: CensusRules = field(default_factory=CensusRules)


@dataclass
class StudyConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    perturbation: PerturbationSection = field(default_factory=PerturbationSection)
    sampler: SamplerConfig = MISSING  # conf/sampler/ must set step_size, nbeta and gamma: no silent defaults
    components: ComponentsSection = field(default_factory=ComponentsSection)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    units: UnitsSection = field(default_factory=UnitsSection)
    head_roles: HeadRolesSection = field(default_factory=HeadRolesSection)
    dataset_level: DatasetLevelSection = field(default_factory=DatasetLevelSection)
    diagnostics: DiagnosticsSection = field(default_factory=DiagnosticsSection)
    seed: int = 0
    run_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = "outputs/unit_cache"  # finished units, shared by every run (resume + idempotence)
    report: bool = True  # write report.html at the end


def register() -> None:
    ConfigStore.instance().store(name="study_schema", node=StudyConfig)
