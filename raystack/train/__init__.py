"""Fault-tolerant, elastic, data-parallel training of the GPT on Ray Train (``TorchTrainer``).

Three modules, split where Ray begins:
- ``raystack.train.config``: the job's spec, ``TrainJobConfig`` (model, data, optimizer, schedule, eval, logging,
  checkpoint, scaling), built from YAML and ``--set`` overrides and validated before any Ray work starts.
- ``raystack.train.loop``: the training loop and its pure pieces, torch only (unit-tested without Ray).
- ``raystack.train.job``: the Ray Train worker entry (``train_loop``) and driver (``fit``), the resume pre-flight
  and the controller callbacks. Imported on first use, so the spec and the loop load without Ray.

Contract:
- ``fit(config)`` packs the corpus with Ray Data (``raystack.data``), runs ``train_loop`` on ``scaling.num_workers``
  workers (an int, or ``[min, max]`` for Ray Train's elastic mode), and exports the model artifact.
  GPUs are used when present (NCCL, bf16 autocast), CPU + gloo otherwise: one code path.
- ``schedule.batch_size`` is the *global* batch in sequences per optimizer step. Each rank takes its slice of the
  step's blocks and accumulates micro-batches of ``schedule.micro_batch_size``; the loss is weighted so the gradient
  is the mean over the global batch whatever the worker count. With the data order keyed by step
  (``raystack.data.batch_indices``), an elastic resize changes only the float summation order.
- Every ``checkpoint.every`` steps (and at the end) the full state is checkpointed through Ray Train
  (``raystack.checkpoint``); ``FailureConfig(max_failures)`` restarts a failed worker group from the latest one,
  and re-running the job with the same ``name`` and ``storage_path`` resumes it. A checkpoint that fails validation
  (missing or truncated files) is skipped with a warning for the newest older one that loads; when none loads, or
  the newest was trained with another model or data config, the run stops with a message saying so (naming the
  differing keys) instead of restarting into the same failure.
- Every report carries ``step``, ``loss``, ``lr``, ``tokens_per_s`` and ``val_loss`` when evaluated; the driver
  appends each to ``<storage_path>/<name>/metrics.jsonl``.
"""

from raystack.train.config import (CheckpointSection, EvalSection, LoggingSection, ModelSection, OptimizerSection,
                                   ScalingSection, ScheduleSection, TrainJobConfig, load_train_config)
from raystack.train.loop import (NoUsableCheckpoint, build_optimizer, evaluate, lr_at, rank_slice, run_training,
                                 train_step)

_JOB = ("fit", "train_loop", "check_resumable", "StopWithoutCheckpoint", "MetricsLog", "TrainMetrics", "TrainOutput")


def __getattr__(name: str):
    if name in _JOB:  # the Ray side, imported when first asked for
        from raystack.train import job

        return getattr(job, name)
    raise AttributeError(f"module 'raystack.train' has no attribute {name!r}")


__all__ = ["TrainJobConfig", "ModelSection", "OptimizerSection", "ScheduleSection", "EvalSection", "LoggingSection",
           "CheckpointSection", "ScalingSection", "load_train_config", "run_training", "lr_at", "build_optimizer",
           "rank_slice", "train_step", "evaluate", "NoUsableCheckpoint", *_JOB]
