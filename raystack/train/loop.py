"""The training loop, Ray-free: pure pieces (schedule, optimizer, one step, evaluation), the loop that runs them
with resume and reporting, and checkpoint restore with fallback. Ray Train (``raystack.train.job``) or Ray Tune
(``raystack.sweep``) drive it by passing their ``report``, checkpoint and data-parallel ``wrap``."""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
import tempfile
import time

import numpy as np
import torch

from raystack.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from raystack.config import from_dict, to_dict
from raystack.data import batch_indices, load_blocks
from raystack.model import GPT, causal_lm_loss
from raystack.train.config import OptimizerSection, ScheduleSection, TrainJobConfig

logger = logging.getLogger(__name__)


def lr_at(step: int, peak: float, schedule: ScheduleSection) -> float:
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine decay to ``peak * min_lr_ratio`` at ``steps``."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and the embedding) only, not on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=True)


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's share of a global batch; shares differ by at most one sequence."""
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def train_step(model, optimizer, blocks: torch.Tensor, schedule: ScheduleSection, grad_clip: float, world_size: int,
               autocast) -> torch.Tensor:
    """One optimizer step on this rank's ``blocks`` ``[n, block_size + 1]``; returns the rank's weighted loss,
    whose sum over ranks divided by ``world_size`` is the global batch's mean loss.

    Each micro-batch's mean loss is weighted by ``len(micro) * world_size / batch_size`` so that, after DDP averages
    gradients over ranks, the gradient is that of the mean loss over the whole global batch.
    """
    chunks = blocks.split(schedule.micro_batch_size)
    total = torch.zeros((), device=blocks.device)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                loss = causal_lm_loss(model, chunk)
            weighted = loss * (len(chunk) * world_size / schedule.batch_size)
            weighted.backward()
        total += weighted.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _module(model):
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model, val_blocks: np.ndarray, config: TrainJobConfig, rank: int, world_size: int, device, autocast):
    """Mean token loss over ``eval.blocks`` validation blocks spread evenly over the whole validation set (the same
    blocks every time: a fixed sample of every held-out document's region, not the first file alone), summed over
    ranks."""
    module = _module(model)
    module.eval()
    n, micro = min(config.eval.blocks, len(val_blocks)), config.schedule.micro_batch_size
    chosen = np.linspace(0, len(val_blocks) - 1, n).round().astype(np.int64)
    mine = val_blocks[chosen[rank_slice(n, rank, world_size)]]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for start in range(0, len(mine), micro):
        chunk = torch.from_numpy(mine[start:start + micro].astype(np.int64)).to(device)
        with autocast():
            loss_sum += causal_lm_loss(module, chunk, reduction="sum").double()
        count += chunk[:, 1:].numel()
    if world_size > 1:
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(count)
    module.train()
    return (loss_sum / count.clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------------
# The loop


def run_training(loop_config: dict, rank: int, world_size: int, device, report, checkpoint, checkpoint_cls,
                 wrap=lambda model, world: model, gauges=None, preemption=None) -> None:
    """The training loop, whoever runs it: a Ray Train worker, or a Tune trial directly (one worker).

    ``report(metrics, checkpoint=...)`` and ``checkpoint`` (the one to resume from, or None) are Ray Train's or
    Ray Tune's; ``wrap`` turns the model into its data-parallel form; ``gauges.record(metrics)``, when given, sees
    every report (rank 0's Prometheus gauges). ``preemption()`` (Ray Train's ``get_preemption_info``, a collective
    every rank calls alike), when given, is asked about every ``checkpoint.preemption_check_s`` seconds of training
    (``_Asks``): on a notice the loop checkpoints at once and then holds (``_hold_for_preemption``), so no step is
    lost.
    """
    config = from_dict(TrainJobConfig, loop_config["config"])
    schedule = config.schedule
    torch.set_num_threads(config.scaling.threads_per_worker or max(1, int(config.scaling.cpus_per_worker)))
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    model, optimizer, start_step = _initial_state(config, rank, world_size, device, checkpoint)
    model = wrap(model, world_size)
    train_blocks, val_blocks, _ = load_blocks(loop_config["data_uri"])
    share = rank_slice(schedule.batch_size, rank, world_size)
    reporter = _Reporter(config, rank, world_size, device, start_step, train_blocks.shape[1] - 1,
                         _module(model).flops_per_token(train_blocks.shape[1] - 1), report, checkpoint_cls, gauges)
    asks = _Asks(config.checkpoint.preemption_check_s if preemption is not None else 0)
    for step in range(start_step, schedule.steps):
        lr = lr_at(step, config.optimizer.lr, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = batch_indices(step, schedule.batch_size, len(train_blocks), config.seed)[share]
        blocks = torch.from_numpy(train_blocks[ids].astype(np.int64)).to(device, non_blocking=True)
        reporter.add(train_step(model, optimizer, blocks, schedule, config.optimizer.grad_clip, world_size, autocast))
        notice = preemption() if asks.due(step + 1) else None
        step_s = reporter.maybe_report(step + 1, lr, model, optimizer,
                                       lambda: evaluate(model, val_blocks, config, rank, world_size, device, autocast),
                                       force_checkpoint=notice is not None)
        asks.pace(step_s)
        if notice is not None and step + 1 < schedule.steps:
            _hold_for_preemption(notice, rank, step + 1)


def _hold_for_preemption(notice, rank: int, step: int) -> None:
    """After the just-in-time checkpoint of a preemption notice: make no more progress that the preemption would
    throw away. With a deadline, wait past it (Ray Train restarts the group from that checkpoint when it passes);
    without one (Ray reported none), carry on training, as every further step may still be kept."""
    deadline_ms = getattr(notice, "deadline_ms", None)
    if rank == 0:
        when = f"deadline in {(deadline_ms / 1000 - time.time()):.0f} s" if deadline_ms else "no deadline given"
        print(f"[raystack] preemption notice for node(s) {', '.join(notice.preempted_node_ids)} ({when}): "
              f"checkpointed step {step}" + ("; waiting for the restart" if deadline_ms else ""), flush=True)
    if not deadline_ms:
        return
    # Ray Train tears the group down once the deadline passes, and this thread ends with it. Should it not (the
    # node was not reclaimed after all), training goes on after a grace period rather than hanging.
    while time.time() < deadline_ms / 1000 + HOLD_GRACE_S:
        time.sleep(1.0)
    if rank == 0:
        print(f"[raystack] no restart {HOLD_GRACE_S:.0f} s after the preemption deadline: training on", flush=True)


HOLD_GRACE_S = 60.0


class _Asks:
    """When the loop asks for a preemption notice: about every ``seconds`` of training (0: never), counted in steps.
    The ask is a collective (a rank that asked alone would wait for the others), so every rank must ask at the same
    steps: the count comes from the mean step time of the last report window, which the report all-reduces, so
    it is the same number on every rank. Until the first report the loop asks every step."""

    def __init__(self, seconds: float):
        self.seconds, self.every, self.last = seconds, 1, 0

    def due(self, done: int) -> bool:
        if not self.seconds or done - self.last < self.every:
            return False
        self.last = done
        return True

    def pace(self, step_s: float | None) -> None:
        """After a report: ``step_s``, the window's mean seconds per step (None: no report this step)."""
        if step_s:  # a huge ``seconds`` over a tiny step is inf as a float: no int, but "never again" all the same
            self.every = max(1, int(min(self.seconds / step_s, 2**62)))


def _initial_state(config: TrainJobConfig, rank: int, world_size: int, device, checkpoint):
    """``(model, optimizer, start_step)``: fresh (the same initial weights on every rank) or restored from
    ``checkpoint``, with each rank's RNG stream set for what follows."""
    seed = config.seed
    torch.manual_seed(seed)
    model = GPT(config.model.build()).to(device)
    optimizer = build_optimizer(model, config.optimizer)
    if not checkpoint:
        torch.manual_seed(seed * 1_000_003 + rank)  # per-rank dropout streams
        return model, optimizer, 0
    meta = _restore(checkpoint, model, optimizer, rank, device)
    start_step = meta["step"]
    if not meta["rng_restored"]:  # a resized group: ranks without saved RNG get a fresh, deterministic stream
        torch.manual_seed(seed * 1_000_003 + start_step * 1_009 + rank)
    if rank == 0:
        print(f"[raystack] resumed from step {start_step} ({world_size} workers)", flush=True)
    return model, optimizer, start_step


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}
"""Dense bf16 tensor-core peaks (vendor datasheets, without sparsity) by a substring of the CUDA device name."""


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak FLOP/s when known (the denominator of MFU); None on CPU or an unknown GPU."""
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class _Reporter:
    """Accumulates the loss over a report window; every ``logging.every`` steps (and at evaluations and checkpoints)
    reports the window's figures to Ray, with a checkpoint when one is due, and shows them on rank 0."""

    def __init__(self, config: TrainJobConfig, rank: int, world_size: int, device, start_step: int, block_tokens: int,
                 flops_per_token: float, report, checkpoint_cls, gauges=None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.start_step, self.report, self.checkpoint_cls = start_step, report, checkpoint_cls
        self.tokens_per_step = config.schedule.batch_size * block_tokens
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)  # per device; None where unknown (CPUs), and then no MFU is claimed
        self.gauges = gauges
        self.loss = torch.zeros((), device=device)
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def maybe_report(self, done: int, lr: float, model, optimizer, evaluate,
                     force_checkpoint: bool = False) -> float | None:
        """Report when one is due, returning the window's mean seconds per step over all ranks (the same float on
        every rank: ``_Asks`` relies on it); None when no report was due."""
        config = self.config
        last = done == config.schedule.steps
        do_eval = last or (config.eval.every and done % config.eval.every == 0)
        do_checkpoint = last or force_checkpoint or done % config.checkpoint.every == 0
        if not (do_eval or do_checkpoint or done % config.logging.every == 0):
            return None
        seconds = time.perf_counter() - self.start
        window = torch.stack([self.loss, torch.tensor(seconds, dtype=self.loss.dtype, device=self.loss.device)])
        if self.world_size > 1:
            torch.distributed.all_reduce(window)
        loss_sum, seconds_sum = window.tolist()
        tokens_per_s = self.steps * self.tokens_per_step / seconds
        metrics = {"step": done, "loss": loss_sum / (self.steps * self.world_size), "lr": lr,
                   "tokens_per_s": tokens_per_s, "world_size": self.world_size,
                   "model_flops_per_s": tokens_per_s * self.flops_per_token, "resumed_from_step": self.start_step}
        metrics["bits_per_byte"] = metrics["loss"] / math.log(2)
        if self.peak:
            metrics["mfu"] = metrics["model_flops_per_s"] / (self.peak * self.world_size)
        if do_eval:
            metrics["val_loss"] = evaluate()
            metrics["val_bits_per_byte"] = metrics["val_loss"] / math.log(2)
        if self.gauges is not None:
            self.gauges.record(metrics)
        if self.rank == 0:
            shown = " ".join(f"{k} {metrics[k]:.4g}" + (f" ({metrics[bpb]:.3f} bits/byte)" if bpb else "")
                             for k, bpb in (("loss", "bits_per_byte"), ("val_loss", "val_bits_per_byte"), ("lr", ""))
                             if k in metrics)
            print(f"[raystack] step {done}/{config.schedule.steps} {shown} tokens/s {tokens_per_s:,.0f}", flush=True)
        if do_checkpoint:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, done, _module(model), optimizer, rank=self.rank,
                                extra={"world_size": self.world_size, **_identity(self.config)})
                self.report(metrics, checkpoint=self.checkpoint_cls.from_directory(directory))
        else:
            self.report(metrics)
        step_s = seconds_sum / (self.world_size * self.steps)
        self.start, self.steps = time.perf_counter(), 0
        self.loss.zero_()
        return step_s


def _identity(config: TrainJobConfig) -> dict:
    """What a checkpoint must share with the config that resumes it: the model's shape and the data."""
    return {"model": config.model.build().to_dict(), "data": to_dict(config.data)}


def _restore(checkpoint, model, optimizer, rank: int, device) -> dict:
    """Load ``checkpoint`` (Ray's latest); when it fails validation or cannot be read, the newest older one of the
    same run that loads, with a warning for each skipped. ``NoUsableCheckpoint`` when none does: the controller
    callback ``_StopWithoutCheckpoint`` then ends the run instead of restarting it into the same failure."""
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
