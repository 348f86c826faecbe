"""The training job's spec: ``TrainJobConfig`` and its sections (model, data, optimizer, schedule, eval, logging,
checkpoint, scaling; the run's name, storage, seed and precision at the top), built from YAML and ``--set``
overrides by ``raystack.config.load_config`` and validated before any Ray work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from raystack import storage
from raystack.config import load_config, to_dict
from raystack.data import DataConfig
from raystack.model import PRESETS, ModelConfig


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


def _at_least(section: str, low: int, **values: int) -> None:
    for name, value in values.items():
        if value < low:
            raise ValueError(f"{section + '.' if section else ''}{name} must be >= {low}, got {value}")


@dataclass
class OptimizerSection:
    """AdamW; weight decay applies to matrices and the embedding, not to norms."""

    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optimizer.lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optimizer.weight_decay and optimizer.grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("optimizer.beta1 and optimizer.beta2 must be in [0, 1)")


@dataclass
class ScheduleSection:
    """How long, how big each step, and the learning-rate curve: linear warmup, then cosine decay."""

    steps: int = 200
    """Optimizer steps in the whole run."""
    batch_size: int = 16
    """Global batch: sequences per optimizer step, summed over all workers."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one worker; the rest of its share is gradient accumulation."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``optimizer.lr * min_lr_ratio``."""

    def __post_init__(self):
        _at_least("schedule", 1, steps=self.steps, batch_size=self.batch_size, micro_batch_size=self.micro_batch_size)
        _at_least("schedule", 0, warmup_steps=self.warmup_steps)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EvalSection:
    every: int = 50
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    blocks: int = 64
    """Validation blocks per evaluation (the same fixed blocks every time)."""

    def __post_init__(self):
        _at_least("eval", 0, every=self.every)
        _at_least("eval", 1, blocks=self.blocks)


@dataclass
class LoggingSection:
    every: int = 10
    """Report metrics (Ray, metrics.jsonl, Prometheus, the console) every N steps."""

    def __post_init__(self):
        _at_least("logging", 1, every=self.every)


@dataclass
class CheckpointSection:
    every: int = 50
    """Checkpoint the full state every N steps (and at the end)."""
    keep: int = 2
    """Checkpoints kept; older ones are deleted."""
    preemption_check_s: float = 1.0
    """Ask Ray Train for a node preemption notice (a drain with a deadline: spot reclaim, ``ray drain-node``) about
    every this many seconds of training; on one, checkpoint at once and hold until the restart, so no step is lost.
    0 = off. Ray's own watcher polls for drains every 5 s, so asking more often gains little; each ask is a round
    trip through Ray Train's synchronization actor that every worker waits on (1.4 ms with one worker, 3 ms with two
    on a 2-core machine), which asked every step would cost a fast GPU step a large share of its time."""

    RENAMED: ClassVar[dict] = {"preemption_check_every": "preemption_check_s"}  # steps then, seconds now

    def __post_init__(self):
        _at_least("checkpoint", 1, every=self.every, keep=self.keep)
        if not (math.isfinite(self.preemption_check_s) and self.preemption_check_s >= 0):
            raise ValueError(f"checkpoint.preemption_check_s must be a number of seconds >= 0 (0 = off), got "
                             f"{self.preemption_check_s}")


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
    threads_per_worker: int = 0
    """torch intra-op threads per worker; 0 = the worker's CPU allocation."""

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
        _at_least("scaling", 0, threads_per_worker=self.threads_per_worker)
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
    seed: int = 0
    """Initial weights, data order and dropout."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)

    RENAMED: ClassVar[dict] = {  # the keys of the old ``train`` section, refused with their new spelling
        **{f"train.{k}": f"schedule.{k}" for k in ("steps", "batch_size", "micro_batch_size", "warmup_steps",
                                                    "min_lr_ratio")},
        **{f"train.{k}": f"optimizer.{k}" for k in ("lr", "weight_decay", "beta1", "beta2", "grad_clip")},
        "train.eval_every": "eval.every", "train.eval_blocks": "eval.blocks", "train.log_every": "logging.every",
        "train.checkpoint_every": "checkpoint.every", "train.keep_checkpoints": "checkpoint.keep",
        "train.seed": "seed", "train.precision": "precision", "train.threads_per_worker": "scaling.threads_per_worker",
    }

    def __post_init__(self):
        storage.check_name("run", self.name)
        _at_least("", 0, seed=self.seed)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
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
