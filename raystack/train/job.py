"""Where Ray begins: the Ray Train worker entry (``train_loop``), the driver (``fit``: pack the data, run
``TorchTrainer``, export the artifact), the pre-flight resume check and the controller callbacks."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
from ray.train.torch import TorchTrainer
from ray.util import metrics as ray_metrics

from raystack import storage
from raystack.checkpoint import CheckpointError, config_differences, export_checkpoint, newest_valid_checkpoint
from raystack.config import to_dict
from raystack.data import prepare_blocks
from raystack.train.config import TrainJobConfig
from raystack.train.loop import NoUsableCheckpoint, _identity, run_training
from raystack.train_report import CONFIG, SAMPLES, write_report

logger = logging.getLogger(__name__)


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function (``TorchTrainer``): DDP over the worker group."""
    ctx = ray.train.get_context()
    print(f"[raystack] worker rank {ctx.get_world_rank()}/{ctx.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()}", flush=True)
    rank = ctx.get_world_rank()
    gauges = TrainMetrics(loop_config["config"]["name"]) if rank == 0 else None
    run_training(loop_config, rank, ctx.get_world_size(), ray.train.torch.get_device(),
                 report=ray.train.report, checkpoint=ray.train.get_checkpoint(),
                 checkpoint_cls=ray.train.Checkpoint, gauges=gauges, preemption=ray.train.get_preemption_info,
                 wrap=lambda m, world: ray.train.torch.prepare_model(m, parallel_strategy="ddp" if world > 1 else None))


class TrainMetrics:
    """Rank 0's gauges on Ray's Prometheus endpoint (``ray_raystack_train_*``), tagged with the run name."""

    NAMES = {"step": "Optimizer steps done.", "loss": "Training loss (mean over the last report window).",
             "val_loss": "Validation loss at the last evaluation.", "tokens_per_s": "Training throughput, tokens/s.",
             "world_size": "Workers in the group."}

    def __init__(self, run: str):
        self.run = run
        self.gauges = {key: ray_metrics.Gauge(f"raystack_train_{key}", text, tag_keys=("run",))
                       for key, text in self.NAMES.items()}

    def record(self, values: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in values:
                gauge.set(float(values[key]), tags={"run": self.run})


class StopWithoutCheckpoint(ray.train.UserCallback):
    """Ends the run (a controller error, which Ray Train does not retry) when a worker found no usable checkpoint,
    so ``max_failures: -1`` cannot turn it into an endless restart loop."""

    def after_exception(self, run_context, worker_exceptions):
        for error in worker_exceptions.values():
            if isinstance(error, NoUsableCheckpoint) or "NoUsableCheckpoint" in str(error):
                raise NoUsableCheckpoint(str(error).strip().splitlines()[-1])


def check_resumable(config: TrainJobConfig) -> None:
    """Before a run starts: ``CheckpointError`` when the run's name already has checkpoints and none is usable, or
    the newest usable one was trained with another model or data config (naming the differing keys)."""
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


class MetricsLog(ray.train.UserCallback):
    """Appends rank 0's report to ``<run_dir>/metrics.jsonl`` (on the controller, for every attempt), writes its
    numbers as TensorBoard scalars under ``<run_dir>/tensorboard`` and rewrites the run's ``report.html``
    (``raystack.train_report``). Local storage only: object stores have no append (Ray Train keeps checkpointed
    metrics there). A report page that cannot be written is logged, never a training failure."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None

    def after_report(self, run_context, metrics, checkpoint):
        if storage.is_uri(self.path) or not metrics:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        row = {**metrics[0], "time": time.time(), "checkpoint": checkpoint is not None}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        try:
            self._tensorboard(row)
            write_report(self.run_dir)
        except Exception:
            logger.exception("could not write the run's TensorBoard events or report.html")

    def _tensorboard(self, row: dict) -> None:
        # tensorboardX's SummaryWriter hands events to a thread of its own, which had not always written the last
        # report's when the controller exited (they were lost): its synchronous EventsWriter, one event per row.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self.writer is None:
            directory = os.path.join(self.run_dir, "tensorboard")
            os.makedirs(directory, exist_ok=True)
            self.writer = EventsWriter(os.path.join(directory, "events"))  # events.out.tfevents.<time>.<host>
        values = [Summary.Value(tag=f"train/{key}", simple_value=float(value)) for key, value in row.items()
                  if key not in ("step", "time", "checkpoint") and isinstance(value, (int, float))]
        self.writer.write_event(Event(wall_time=row["time"], step=row.get("step", 0), summary=Summary(value=values)))
        self.writer.flush()


SAMPLE_PROMPTS = ("def ", "import ", "class ")


def _write_samples(artifact: str, path: str) -> None:
    """A few completions of the exported model (seeded, so a re-run shows the same), for the run's report."""
    import asyncio

    from raystack.engine import Engine, EngineConfig, GenerationParams, generate_text

    async def complete():
        engine = Engine.from_artifact(artifact, EngineConfig(max_batch_size=len(SAMPLE_PROMPTS)))
        try:
            return await asyncio.gather(*(generate_text(engine, p, GenerationParams(max_tokens=80, temperature=0.6,
                                                                                    seed=7))
                                          for p in SAMPLE_PROMPTS))
        finally:
            await engine.shutdown()

    try:
        results = asyncio.run(complete())
    except Exception:  # the run's figures are written regardless; the page says the samples are missing
        logger.exception("could not generate the report's samples from %s", artifact)
        return
    with open(path, "w") as f:
        json.dump([{"prompt": p, "completion": r["text"]} for p, r in zip(SAMPLE_PROMPTS, results)], f, indent=2)


# Ray Train's controller takes at most one report per worker each time it polls the worker group (each worker's
# result queue holds one; ``report`` blocks while it is full), and it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# 2 s by default: a loop reporting more often than that trains at one report window per 2 s (a 20-step run with
# ``logging.every: 1`` spent 40 s waiting for polls around 1.3 s of steps). A poll is one small task per worker, so
# the interval grows with the group: 0.1 s up to 10 workers, Ray's 2 s from 200.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def report_poll_s(max_workers: int) -> float:
    """The controller's poll interval for a group of up to ``max_workers``: ~100 worker polls a second at most."""
    return min(2.0, max(0.1, max_workers / 100))


@contextmanager
def polling_reports_promptly(max_workers: int):
    """Around ``TorchTrainer.fit``, which hands the driver's variable to the controller it starts: the interval of
    ``report_poll_s``, unless the variable is set already (the user's choice wins)."""
    if POLL_ENV in os.environ:
        yield
        return
    os.environ[POLL_ENV] = f"{report_poll_s(max_workers):g}"
    try:
        yield
    finally:
        os.environ.pop(POLL_ENV, None)


def _use_gpu(setting) -> bool:
    if setting != "auto":
        return bool(setting)
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass
class TrainOutput:
    artifact: str
    metrics: dict
    checkpoint_path: str
    run_dir: str


def fit(config: TrainJobConfig, callbacks=()) -> TrainOutput:
    """Pack the data, train on Ray Train, export the model artifact. Needs a connected Ray (``ray.init``)."""
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
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
        callbacks=[MetricsLog(config.run_dir), StopWithoutCheckpoint(), *callbacks],
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(config), "data_uri": data_uri},
        scaling_config=scaling,
        run_config=run_config,
    )
    local = not storage.is_uri(config.run_dir)
    if local:
        storage.make_local_dir(config.run_dir, "storage_path")
        with open(os.path.join(config.run_dir, CONFIG), "w") as f:
            json.dump(to_dict(config), f, indent=2)
    with polling_reports_promptly(config.scaling.max_workers):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        artifact = export_checkpoint(directory, config.model.build(), config.artifact_path)
    if local:
        _write_samples(artifact, os.path.join(config.run_dir, SAMPLES))
        write_report(config.run_dir)
    return TrainOutput(artifact=artifact, metrics=dict(result.metrics or {}),
                       checkpoint_path=result.checkpoint.path, run_dir=config.run_dir)
