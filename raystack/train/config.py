"""The training job's spec: ``TrainJobConfig`` and its sections (model, data, optimizer, scaling, storage), built from
YAML and ``--set`` overrides by ``raystack.config.load_config`` and validated before any Ray work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

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
