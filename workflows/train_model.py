"""Train a model on the corpus with the induction-forming curriculum: ``python -m workflows.train_model``.

Seeded; writes ``model.safetensors`` + ``training_state.pt`` every ``checkpoint_every`` steps and
resumes from them when re-run with the same ``out_dir``; logs the loss per domain; at the end scores
every head and writes ``MODEL_CARD.md`` (and copies both files to ``export_to`` when set).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from susc_core.model.checkpoint import (file_sha256, load_model, load_training_state, save_model,
                                        save_training_state)
from susc_core.data.corpus import load_contexts
from susc_core.model.head_roles import CensusRules, head_labels, measured_roles, repeat_test_scores
from susc_core.model.transformer import ModelConfig, Transformer, init_params, n_params
from susc_core.model.training import (CurriculumConfig, OptimConfig, domain_losses, head_gate_hooks, make_optimizer,
                                      phase_at, sample_batch, total_steps, train_step)
from workflows.runtime import get_logger, resolve_device

log = get_logger("train_model")


@dataclass
class HeadScoreConfig:
    n_seqs: int = 16  # repeated random sequences scored
    half_len: int = 50  # tokens before the repeat (the paper-style 50-token test)
    natural_contexts: int = 16  # held-out probe contexts per natural domain for the multigram measure
    census: CensusRules = field(default_factory=CensusRules)  # role rules (model_card's census)


@dataclass
class TrainAppConfig:
    arch: ModelConfig = field(default_factory=ModelConfig)  # conf/arch/: the architecture trained
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head_scores: HeadScoreConfig = field(default_factory=HeadScoreConfig)
    out_dir: str = "outputs/train_model/default"
    corpus_dir: str = "data/corpus"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    eval_every: int = 250  # steps between per-domain loss evaluations
    eval_contexts: int = 32  # held-out probe contexts per domain for those evaluations
    checkpoint_every: int = 250
    export_to: str | None = None  # folder that receives model.safetensors renamed + MODEL_CARD.md
    export_name: str = "default_model.safetensors"
    export_card: str = "MODEL_CARD.md"  # the card's name in export_to
    notes_file: str | None = "susc_core/assets/TRAINING_NOTES.md"  # what was tried (prose), appended to the card


ConfigStore.instance().store(name="train_model_schema", node=TrainAppConfig)


def _eval_sets(corpus_dir: Path, n: int, seq_len: int) -> dict[str, torch.Tensor]:
    probes = sorted((corpus_dir / "probes").glob("*.parquet"))
    return {p.stem: load_contexts(p)[:n, : seq_len + 1] for p in probes}


def model_card(cfg: TrainAppConfig, summary: dict) -> str:
    """Markdown model card: command, tokens seen, wall time, domain losses, every head's scores."""
    labels = head_labels(cfg.arch)
    scores, effects, census = summary["head_scores"], summary["ablation"], summary["roles"]
    hs = cfg.head_scores
    rows = "\n".join(
        f"| {label} | {scores['induction'][i]:.3f} | {scores['previous_token'][i]:.3f} | {scores['current_token'][i]:.3f} "
        f"| {effects['natural'][i]:+.3f} | {effects['repeat'][i]:+.3f} | {census[i]} |"
        for i, label in enumerate(labels))
    counts = ", ".join(f"{role} {census.count(role)}" for role in ("induction", "previous_token", "multigram", "other"))
    losses = "\n".join(f"| {d} | {v:.3f} |" for d, v in summary["domain_losses"].items())
    phases = "\n".join(f"| {i + 1} | {p.steps} | {p.seq_len} | {p.synthetic_share} | {p.synthetic_vocab or cfg.arch.d_vocab} |"
                       for i, p in enumerate(cfg.curriculum.phases))
    return f"""# Model card: bundled default model

Trained by this project, offline, on the corpus built by `python -m workflows.build_corpus`.

- Command: `{summary['command']}`
- Architecture: {json.dumps(cfg.arch.to_dict())}; {summary['n_params']:,} parameters; shortformer
  positions; attention-only.
- Optimiser: AdamW lr {cfg.optim.lr}, weight decay {cfg.optim.weight_decay}, betas ({cfg.optim.beta1},
  {cfg.optim.beta2}), warm-up {cfg.optim.warmup_steps} steps, grad clip {cfg.optim.grad_clip}; batch
  {cfg.curriculum.batch_size}; seed {cfg.seed}.
- Steps: {summary['steps']:,}; tokens seen: {summary['tokens_seen']:,}; wall time: {summary['wall_s']:.0f} s
  on {summary['device']} ({summary['threads']} threads).
- Weights sha256: `{summary['sha256']}`; corpus manifest hash: `{summary['corpus_hash']}`.

## Curriculum
| phase | steps | sequence length | synthetic share ({cfg.curriculum.repeats.family} repeats, segments {cfg.curriculum.repeats.seg_min}-{cfg.curriculum.repeats.seg_max}) | synthetic ids below |
|---|---|---|---|---|
{phases}

## Held-out loss per domain (nats/token, {cfg.eval_contexts} probe contexts each)
| domain | loss |
|---|---|
{losses}

## Head scores and roles
Attention scores on {hs.n_seqs} sequences of {min(hs.half_len, cfg.arch.n_ctx // 2)} random tokens repeated
twice. Ablation: mean loss increase (nats) when the head's output is zeroed, on {hs.natural_contexts} held-out
contexts of each natural domain ({", ".join(hs.census.natural_domains)}) and on the second copy of the repeated
sequences. Role (`susc_core.model.head_roles.head_census`): induction or previous-token when that score is
≥ {hs.census.role_threshold}; multigram when induction < {hs.census.multigram_max_induction} and the natural-text
ablation increase is ≥ {hs.census.multigram_min_natural} nats and above the repeat increase; else other. Census: {counts}.

| head | induction | previous-token | current-token | ablation natural | ablation repeat | role |
|---|---|---|---|---|---|---|
{rows}
"""


def head_roles_of(params: dict, cfg: TrainAppConfig, corpus: Path) -> tuple[dict, dict, list[str]]:
    """Attention scores, ablation effects (the multigram measure) and the role census of every head,
    on fresh repeated random sequences and held-out natural-text probe contexts."""
    hs = cfg.head_scores
    natural = torch.cat([load_contexts(corpus / "probes" / f"{d}.parquet")[:hs.natural_contexts, : cfg.arch.n_ctx + 1]
                         for d in hs.census.natural_domains])
    return measured_roles(params, cfg.arch, natural, hs.census, hs.n_seqs, hs.half_len,
                          np.random.default_rng([cfg.seed, 1]), np.random.default_rng([cfg.seed, 2]))


class Progress(NamedTuple):
    """Where a training run stands: the next step, tokens seen so far, wall seconds spent before this process."""

    step: int
    tokens_seen: int
    wall_s: float


def _resume(out: Path, cfg: TrainAppConfig, model: Transformer, optimizer, generator: np.random.Generator) -> Progress:
    """Restore weights, optimizer and batch-generator state from ``out`` when a run stopped there; else step 0."""
    state_path = out / "training_state.pt"
    if not state_path.exists():
        return Progress(0, 0, 0.0)
    _, saved = load_model(out / "model.safetensors", expected=cfg.arch)
    model.load_state_dict(saved)
    state = load_training_state(state_path)
    optimizer.load_state_dict(state["optimizer"])
    generator.bit_generator.state = json.loads(state["numpy_rng"])
    log.info("resuming from %s at step %d", state_path, state["step"])
    return Progress(state["step"], state["tokens_seen"], state["wall_s"])


def _log_eval(model: Transformer, cfg: TrainAppConfig, evals: dict, done: int, steps: int, loss: float) -> None:
    """Log the held-out loss per domain and the induction / previous-token score of every head."""
    params_now = model.params()
    losses = domain_losses(params_now, cfg.arch, evals)
    cpu_params = {k: v.detach().cpu() for k, v in params_now.items()}
    roles = repeat_test_scores(cpu_params, cfg.arch, np.random.default_rng([cfg.seed, 1]), cfg.head_scores.n_seqs,
                               cfg.head_scores.half_len)
    log.info("step %d/%d loss %.3f | %s | induction per head %s | previous-token per head %s", done, steps, loss,
             " ".join(f"{k} {v:.3f}" for k, v in losses.items()), " ".join(f"{v:.2f}" for v in roles["induction"]),
             " ".join(f"{v:.2f}" for v in roles["previous_token"]))


def _finish(cfg: TrainAppConfig, params: dict, evals: dict, progress: Progress, device: torch.device) -> dict:
    """The summary (losses, head scores, roles, hashes), ``MODEL_CARD.md`` and ``summary.json`` in the output
    folder, and the export of weights and card when ``export_to`` is set."""
    out, corpus = Path(cfg.out_dir), Path(cfg.corpus_dir)
    scores, effects, roles = head_roles_of(params, cfg, corpus)
    manifest = corpus / "manifest.json"
    summary = {
        "command": "python -m workflows.train_model " + " ".join(sys.argv[1:]),
        "n_params": n_params(cfg.arch), "steps": progress.step, "tokens_seen": progress.tokens_seen,
        "wall_s": progress.wall_s, "device": str(device), "threads": torch.get_num_threads(),
        "domain_losses": domain_losses(params, cfg.arch, {k: v.cpu() for k, v in evals.items()}),
        "head_scores": {k: v.tolist() for k, v in scores.items()},
        "ablation": {k: v.tolist() for k, v in effects.items()}, "roles": roles,
        "sha256": file_sha256(out / "model.safetensors"),
        "corpus_hash": json.loads(manifest.read_text()).get("content_hash", "") if manifest.exists() else "",
    }
    card = model_card(cfg, summary)
    if cfg.notes_file and Path(cfg.notes_file).exists():
        card += "\n" + Path(cfg.notes_file).read_text()
    (out / "MODEL_CARD.md").write_text(card)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("head scores:\n%s", card.split("## Head scores", 1)[1])
    if cfg.export_to:
        export = Path(cfg.export_to)
        export.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "model.safetensors", export / cfg.export_name)
        (export / cfg.export_card).write_text(card)
        log.info("exported %s and %s to %s", cfg.export_name, cfg.export_card, export)
    return summary


def train(cfg: TrainAppConfig) -> dict:
    """Run (or resume) training; returns the summary that goes into the model card."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    corpus = Path(cfg.corpus_dir)
    contexts = load_contexts(corpus / "train.parquet").numpy()
    if contexts.max() >= cfg.arch.d_vocab:
        raise ValueError(f"corpus token ids reach {contexts.max()} but arch.d_vocab={cfg.arch.d_vocab}; "
                         f"rebuild the corpus or set arch.d_vocab to the tokenizer's vocabulary size")
    evals = {k: v.to(device) for k, v in _eval_sets(corpus, cfg.eval_contexts, cfg.arch.n_ctx).items()}
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.arch, init_params(cfg.arch, torch.Generator().manual_seed(cfg.seed))).to(device)
    optimizer = make_optimizer(list(model.parameters()), cfg.optim)
    generator = np.random.default_rng(cfg.seed)
    start, tokens_seen, wall = _resume(out, cfg, model, optimizer, generator)
    steps = total_steps(cfg.curriculum)
    t0 = time.perf_counter() - wall
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        phase = phase_at(cfg.curriculum, step)
        batch = sample_batch(generator, contexts, phase, cfg.curriculum, cfg.arch.d_vocab).to(device)
        loss = train_step(model, optimizer, batch, cfg.optim, step, head_gate_hooks(cfg.arch, phase.active_heads))
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step}; lower optim.lr or raise warm-up")
        tokens_seen += batch.shape[0] * (batch.shape[1] - 1)
        bar.set_postfix(loss=f"{loss:.3f}", seq=phase.seq_len)
        done = step + 1
        if done % cfg.eval_every == 0 or done == steps:
            _log_eval(model, cfg, evals, done, steps, loss)
        if done % cfg.checkpoint_every == 0 or done == steps:
            save_model(out / "model.safetensors", cfg.arch, model.params())
            save_training_state(out / "training_state.pt", {
                "optimizer": optimizer.state_dict(), "step": done, "tokens_seen": tokens_seen,
                "wall_s": time.perf_counter() - t0, "numpy_rng": json.dumps(generator.bit_generator.state)})
    params = {k: v.detach().cpu() for k, v in model.params().items()}
    return _finish(cfg, params, evals, Progress(steps, tokens_seen, time.perf_counter() - t0), device)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_model")
def main(cfg) -> None:
    train(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
