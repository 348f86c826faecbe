"""Fault-tolerant, elastic, data-parallel training of the GPT on Ray Train (``TorchTrainer``).

Contract:
- ``TrainJobConfig`` is the whole job (model, data, optimizer, scaling, storage); ``load_config`` builds it from YAML
  and ``--set`` overrides and validates it before any Ray work starts.
- ``fit(config)`` packs the corpus with Ray Data (``raystack.data``), runs ``train_loop`` on ``scaling.num_workers``
  workers (an int, or ``[min, max]`` for Ray Train's elastic mode), and exports the model artifact.
  GPUs are used when present (NCCL, bf16 autocast), CPU + gloo otherwise: one code path.
- ``train.batch_size`` is the *global* batch in sequences per optimizer step. Each rank takes its slice of the
  step's blocks and accumulates micro-batches of ``train.micro_batch_size``; the loss is weighted so the gradient
  is the mean over the global batch whatever the worker count. With the data order keyed by step
  (``raystack.data.batch_indices``), an elastic resize changes only the float summation order.
- Every ``train.checkpoint_every`` steps (and at the end) the full state is checkpointed through Ray Train
  (``raystack.checkpoint``); ``FailureConfig(max_failures)`` restarts a failed worker group from the latest one,
  and re-running the job with the same ``name`` and ``storage_path`` resumes it. A checkpoint that fails validation
  (missing or truncated files) is skipped with a warning for the newest older one that loads; when none loads, or
  the newest was trained with another model or data config, the run stops with a message saying so (naming the
  differing keys) instead of restarting into the same failure.
- Every report carries ``step``, ``loss``, ``lr``, ``tokens_per_s`` and ``val_loss`` when evaluated; the driver
  appends each to ``<storage_path>/<name>/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from raystack import storage
from raystack.config import from_dict, load_config, to_dict
from raystack.data import DataConfig, batch_indices, load_blocks
from raystack.model import GPT, PRESETS, ModelConfig, causal_lm_loss

logger = logging.getLogger(__name__)


@dataclass
class ModelSection:
    preset: str = "tiny"
    """One of ``raystack.model.PRESETS``; the fields below override it."""
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    max_seq_len: Optional[int] = None
    dropout: Optional[float] = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is not one of {sorted(PRESETS)}")

    def build(self) -> ModelConfig:
        overrides = {k: v for k, v in to_dict(self).items() if k != "preset" and v is not None}
        return ModelConfig.from_preset(self.preset, **overrides)


@dataclass
class OptimSection:
    steps: int = 200
    """Optimizer steps in the whole run."""
    batch_size: int = 16
    """Global batch: sequences per optimizer step, summed over all workers."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one worker; the rest of its share is gradient accumulation."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    eval_every: int = 50
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    eval_blocks: int = 64
    """Validation blocks per evaluation (the same fixed blocks every time)."""
    log_every: int = 10
    """Report metrics every N steps."""
    checkpoint_every: int = 50
    """Checkpoint the full state every N steps (and at the end)."""
    keep_checkpoints: int = 2
    seed: int = 0
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    threads_per_worker: int = 0
    """torch intra-op threads per worker; 0 = the worker's CPU allocation."""

    def __post_init__(self):
        positive = ("steps", "batch_size", "micro_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                    "eval_blocks")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "threads_per_worker", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("train.beta1 and train.beta2 must be in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class ScalingSection:
    num_workers: Union[int, list[int]] = 2
    """Workers: an int, or ``[min, max]`` for elastic training (Ray Train grows and shrinks the group)."""
    use_gpu: Union[bool, str] = "auto"
    """``auto``: a GPU per worker when the cluster has GPUs."""
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    """Worker-group restarts (from the latest checkpoint) before the run fails; -1 = unlimited."""
    placement_strategy: str = "PACK"
    """How workers spread over nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node)."""

    def __post_init__(self):
        workers = self.num_workers
        if isinstance(workers, list):
            if len(workers) != 2 or not 1 <= workers[0] <= workers[1]:
                raise ValueError(f"scaling.num_workers must be an int or [min, max] with 1 <= min <= max, got {workers}")
        elif workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {workers}")
        if self.use_gpu not in (True, False, "auto"):
            raise ValueError(f"scaling.use_gpu must be true, false or auto, got {self.use_gpu!r}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"scaling.max_failures must be >= -1, got {self.max_failures}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError("scaling.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


@dataclass
class TrainJobConfig:
    name: str = "raystack-tiny"
    """Run name: a re-run with the same name and storage_path resumes from its latest checkpoint."""
    storage_path: str = "~/raystack_runs"
    """Where checkpoints, packed data, metrics and the artifact go: a local path or a URI shared by all nodes."""
    export_path: Optional[str] = None
    """Where the model artifact goes; default ``<storage_path>/<name>/model``."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)

    def __post_init__(self):
        storage.check_name("run", self.name)
        model = self.model.build()
        if self.data.block_size > model.max_seq_len:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds the model's max_seq_len ({model.max_seq_len}); "
                "lower data.block_size or raise model.max_seq_len"
            )

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def artifact_path(self) -> str:
        return self.export_path or storage.join(self.run_dir, "model")


def load_train_config(path=None, overrides=()) -> TrainJobConfig:
    return load_config(TrainJobConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------------------
# Pure training pieces (unit-tested without Ray)


def lr_at(step: int, cfg: OptimSection) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and the embedding) only, not on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=True)


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's share of a global batch; shares differ by at most one sequence."""
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def train_step(model, optimizer, blocks: torch.Tensor, cfg: OptimSection, world_size: int, autocast) -> torch.Tensor:
    """One optimizer step on this rank's ``blocks`` ``[n, block_size + 1]``; returns the rank's weighted loss,
    whose sum over ranks divided by ``world_size`` is the global batch's mean loss.

    Each micro-batch's mean loss is weighted by ``len(micro) * world_size / batch_size`` so that, after DDP averages
    gradients over ranks, the gradient is that of the mean loss over the whole global batch.
    """
    chunks = blocks.split(cfg.micro_batch_size)
    total = torch.zeros((), device=blocks.device)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                loss = causal_lm_loss(model, chunk)
            weighted = loss * (len(chunk) * world_size / cfg.batch_size)
            weighted.backward()
        total += weighted.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _module(model):
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model, val_blocks: np.ndarray, cfg: OptimSection, rank: int, world_size: int, device, autocast):
    """Mean token loss over the first ``eval_blocks`` validation blocks, summed over ranks."""
    module = _module(model)
    module.eval()
    n = min(cfg.eval_blocks, len(val_blocks))
    mine = val_blocks[rank_slice(n, rank, world_size)]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for start in range(0, len(mine), cfg.micro_batch_size):
        chunk = torch.from_numpy(mine[start:start + cfg.micro_batch_size].astype(np.int64)).to(device)
        with autocast():
            loss_sum += causal_lm_loss(module, chunk, reduction="sum").double()
        count += chunk[:, 1:].numel()
    if world_size > 1:
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(count)
    module.train()
    return (loss_sum / count.clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------------
# The Ray Train worker loop


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function (``TorchTrainer``): DDP over the worker group."""
    import ray.train
    import ray.train.torch

    import ray

    ctx = ray.train.get_context()
    print(f"[raystack] worker rank {ctx.get_world_rank()}/{ctx.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()}", flush=True)
    run_training(loop_config, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                 report=ray.train.report, checkpoint=ray.train.get_checkpoint(),
                 checkpoint_cls=ray.train.Checkpoint,
                 wrap=lambda m, world: ray.train.torch.prepare_model(m, parallel_strategy="ddp" if world > 1 else None))


class _TrainMetrics:
    """Rank 0's gauges on Ray's Prometheus endpoint (``ray_raystack_train_*``), tagged with the run name."""

    NAMES = {"step": "Optimizer steps done.", "loss": "Training loss (mean over the last report window).",
             "val_loss": "Validation loss at the last evaluation.", "tokens_per_s": "Training throughput, tokens/s.",
             "world_size": "Workers in the group."}

    def __init__(self, run: str):
        from ray.util import metrics

        self.run = run
        self.gauges = {key: metrics.Gauge(f"raystack_train_{key}", text, tag_keys=("run",))
                       for key, text in self.NAMES.items()}

    def record(self, values: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in values:
                gauge.set(float(values[key]), tags={"run": self.run})


def run_training(loop_config: dict, rank: int, world_size: int, device, report, checkpoint, checkpoint_cls,
                 wrap=lambda model, world: model) -> None:
    """The training loop, whoever runs it: a Ray Train worker, or a Tune trial directly (one worker).

    ``report(metrics, checkpoint=...)`` and ``checkpoint`` (the one to resume from, or None) are Ray Train's or
    Ray Tune's; ``wrap`` turns the model into its data-parallel form.
    """
    config = from_dict(TrainJobConfig, loop_config["config"])
    cfg = config.train
    torch.set_num_threads(cfg.threads_per_worker or max(1, int(config.scaling.cpus_per_worker)))
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    model, optimizer, start_step = _initial_state(config, rank, world_size, device, checkpoint)
    model = wrap(model, world_size)
    train_blocks, val_blocks, _ = load_blocks(loop_config["data_uri"])
    share = rank_slice(cfg.batch_size, rank, world_size)
    reporter = _Reporter(config, rank, world_size, device, start_step, train_blocks.shape[1] - 1,
                         _module(model).flops_per_token(train_blocks.shape[1] - 1), report, checkpoint_cls)
    for step in range(start_step, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = batch_indices(step, cfg.batch_size, len(train_blocks), cfg.seed)[share]
        blocks = torch.from_numpy(train_blocks[ids].astype(np.int64)).to(device, non_blocking=True)
        reporter.add(train_step(model, optimizer, blocks, cfg, world_size, autocast))
        reporter.maybe_report(step + 1, lr, model, optimizer,
                              lambda: evaluate(model, val_blocks, cfg, rank, world_size, device, autocast))


def _initial_state(config: TrainJobConfig, rank: int, world_size: int, device, checkpoint):
    """``(model, optimizer, start_step)``: fresh (the same initial weights on every rank) or restored from
    ``checkpoint``, with each rank's RNG stream set for what follows."""
    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = GPT(config.model.build()).to(device)
    optimizer = build_optimizer(model, cfg)
    if not checkpoint:
        torch.manual_seed(cfg.seed * 1_000_003 + rank)  # per-rank dropout streams
        return model, optimizer, 0
    meta = _restore(checkpoint, model, optimizer, rank, device)
    start_step = meta["step"]
    if not meta["rng_restored"]:  # a resized group: ranks without saved RNG get a fresh, deterministic stream
        torch.manual_seed(cfg.seed * 1_000_003 + start_step * 1_009 + rank)
    if rank == 0:
        print(f"[raystack] resumed from step {start_step} ({world_size} workers)", flush=True)
    return model, optimizer, start_step


class _Reporter:
    """Accumulates the loss over a report window; every ``log_every`` steps (and at evaluations and checkpoints)
    reports the window's figures to Ray, with a checkpoint when one is due, and shows them on rank 0."""

    def __init__(self, config: TrainJobConfig, rank: int, world_size: int, device, start_step: int, block_tokens: int,
                 flops_per_token: float, report, checkpoint_cls):
        self.config, self.cfg, self.rank, self.world_size = config, config.train, rank, world_size
        self.start_step, self.report, self.checkpoint_cls = start_step, report, checkpoint_cls
        self.tokens_per_step = config.train.batch_size * block_tokens
        self.flops_per_token = flops_per_token
        self.gauges = _TrainMetrics(config.name) if rank == 0 else None
        self.loss = torch.zeros((), device=device)
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def maybe_report(self, done: int, lr: float, model, optimizer, evaluate) -> None:
        cfg = self.cfg
        last = done == cfg.steps
        do_eval = last or (cfg.eval_every and done % cfg.eval_every == 0)
        do_checkpoint = last or done % cfg.checkpoint_every == 0
        if not (do_eval or do_checkpoint or done % cfg.log_every == 0):
            return
        if self.world_size > 1:
            torch.distributed.all_reduce(self.loss)
        tokens_per_s = self.steps * self.tokens_per_step / (time.perf_counter() - self.start)
        metrics = {"step": done, "loss": self.loss.item() / (self.steps * self.world_size), "lr": lr,
                   "tokens_per_s": tokens_per_s, "world_size": self.world_size,
                   "model_flops_per_s": tokens_per_s * self.flops_per_token, "resumed_from_step": self.start_step}
        if do_eval:
            metrics["val_loss"] = evaluate()
        if self.gauges is not None:
            self.gauges.record(metrics)
        if self.rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "val_loss", "lr"))
            print(f"[raystack] step {done}/{cfg.steps} {shown} tokens/s {tokens_per_s:,.0f}", flush=True)
        if do_checkpoint:
            from raystack.checkpoint import save_checkpoint

            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, done, _module(model), optimizer, rank=self.rank,
                                extra={"world_size": self.world_size, **_identity(self.config)})
                self.report(metrics, checkpoint=self.checkpoint_cls.from_directory(directory))
        else:
            self.report(metrics)
        self.start, self.steps = time.perf_counter(), 0
        self.loss.zero_()


def _identity(config: TrainJobConfig) -> dict:
    """What a checkpoint must share with the config that resumes it: the model's shape and the data."""
    return {"model": config.model.build().to_dict(), "data": to_dict(config.data)}


def _restore(checkpoint, model, optimizer, rank: int, device) -> dict:
    """Load ``checkpoint`` (Ray's latest); when it fails validation or cannot be read, the newest older one of the
    same run that loads, with a warning for each skipped. ``NoUsableCheckpoint`` when none does: the controller
    callback ``_StopWithoutCheckpoint`` then ends the run instead of restarting it into the same failure."""
    from raystack.checkpoint import list_checkpoints, load_checkpoint

    candidates = [checkpoint]
    path, fs = getattr(checkpoint, "path", None), getattr(checkpoint, "filesystem", None)
    if path and fs is not None:
        name = posixpath.basename(path.rstrip("/"))
        candidates += [type(checkpoint)(p, filesystem=fs) for p in list_checkpoints(fs, posixpath.dirname(path))
                       if posixpath.basename(p) < name]
    problems = []
    for candidate in candidates:
        try:
            with candidate.as_directory() as directory:
                meta = load_checkpoint(directory, model, optimizer, rank=rank, device=device)
        except Exception as e:  # torn: a missing or truncated file, a corrupt marker, weights of another shape
            problems.append(f"{getattr(candidate, 'path', candidate)}: {type(e).__name__}: {e}")
            logger.warning("skipping checkpoint %s", problems[-1])
            continue
        if problems and rank == 0:
            print(f"[raystack] WARNING: skipped {len(problems)} unusable checkpoint(s); resuming from "
                  f"{getattr(candidate, 'path', candidate)} (step {meta['step']})", flush=True)
        return meta
    raise NoUsableCheckpoint("no checkpoint of this run can be loaded: " + "; ".join(problems)
                             + ". Delete the run's checkpoints to start over, or train under another name")


class NoUsableCheckpoint(RuntimeError):
    """Every checkpoint of a run failed to load: restarting the workers would fail the same way."""


def stop_without_checkpoint_callback():
    import ray.train

    class StopWithoutCheckpoint(ray.train.UserCallback):
        """Ends the run (a controller error, which Ray Train does not retry) when a worker found no usable
        checkpoint, so ``max_failures: -1`` cannot turn it into an endless restart loop."""

        def after_exception(self, run_context, worker_exceptions):
            for error in worker_exceptions.values():
                if isinstance(error, NoUsableCheckpoint) or "NoUsableCheckpoint" in str(error):
                    raise NoUsableCheckpoint(str(error).strip().splitlines()[-1])

    return StopWithoutCheckpoint()


def check_resumable(config: TrainJobConfig) -> None:
    """Before a run starts: ``CheckpointError`` when the run's name already has checkpoints and none is usable, or
    the newest usable one was trained with another model or data config (naming the differing keys)."""
    from raystack.checkpoint import CheckpointError, config_differences, newest_valid_checkpoint

    path, meta, problems = newest_valid_checkpoint(config.run_dir)
    if path is None and problems:
        raise CheckpointError(
            f"run {config.name!r} cannot resume: none of its {len(problems)} checkpoint(s) under {config.run_dir} "
            f"is usable ({problems[0]}). Delete them to start over, or train under another name")
    if path is None:
        return
    for problem in problems:
        logger.warning("skipping unusable checkpoint: %s", problem)
    differences = config_differences(meta, _identity(config))
    if differences:
        raise CheckpointError(
            f"run {config.name!r} already has checkpoints of another configuration (newest: {path}): "
            + "; ".join(differences) + ". Train under another name, or restore those settings to resume it")


# ----------------------------------------------------------------------------------------------------------------
# Driver side


def _metrics_log_callback(run_dir: str):
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        """Appends rank 0's report to ``<run_dir>/metrics.jsonl`` (on the controller, for every attempt)."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            if storage.is_uri(self.path) or not metrics:
                return  # object stores have no append; Ray Train keeps checkpointed metrics there
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({**metrics[0], "time": time.time()}) + "\n")

    return MetricsLog(os.path.join(run_dir, "metrics.jsonl"))


def _use_gpu(setting) -> bool:
    if setting != "auto":
        return bool(setting)
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass
class TrainOutput:
    artifact: str
    metrics: dict
    checkpoint_path: str
    run_dir: str


def fit(config: TrainJobConfig, callbacks=()) -> TrainOutput:
    """Pack the data, train on Ray Train, export the model artifact. Needs a connected Ray (``ray.init``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raystack.checkpoint import export_checkpoint
    from raystack.data import prepare_blocks

    check_resumable(config)
    data_uri = prepare_blocks(config.data, storage.join(config.run_dir, "data"))
    workers = config.scaling.num_workers
    scaling = ray.train.ScalingConfig(
        num_workers=tuple(workers) if isinstance(workers, list) else workers,
        use_gpu=_use_gpu(config.scaling.use_gpu),
        resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        placement_strategy=config.scaling.placement_strategy,
    )
    run_config = ray.train.RunConfig(
        name=config.name,
        storage_path=storage.join(config.storage_path),  # absolute local path, or the URI itself
        failure_config=ray.train.FailureConfig(max_failures=config.scaling.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        callbacks=[_metrics_log_callback(config.run_dir), stop_without_checkpoint_callback(), *callbacks],
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(config), "data_uri": data_uri},
        scaling_config=scaling,
        run_config=run_config,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        artifact = export_checkpoint(directory, config.model.build(), config.artifact_path)
    return TrainOutput(artifact=artifact, metrics=dict(result.metrics or {}),
                       checkpoint_path=result.checkpoint.path, run_dir=config.run_dir)


__all__ = ["TrainJobConfig", "load_train_config", "fit", "train_loop", "run_training", "lr_at"]
