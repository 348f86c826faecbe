"""Sweep efficiency: TPE + ASHA against random search without early stopping, equal trial budget, several seeds.

    python benchmarks/sweep_efficiency.py [--seeds 0 1 2] [--trials 8] [--steps 30]

Both arms sweep tune_spaces/gpt_tiny.yaml with the same trial budget (so random search spends trials x steps
training steps), on the same packed corpus. Per seed it prints each arm's best validation loss and the training
steps it spent, and the compute TPE + ASHA needed to first reach random search's best loss (steps spent, in trial
start order, until its best-so-far was at least as good), as a share of random search's steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPACE = Path(__file__).resolve().parent.parent / "tune_spaces" / "gpt_tiny.yaml"


def arm(storage: str, seed: int, trials: int, steps: int, tpe_asha: bool) -> dict:
    from raystack.sweep import load_space, run_sweep
    from raystack.sweep_report import collect

    name = f"{'tpe-asha' if tpe_asha else 'random'}-{seed}"
    space = load_space(SPACE, [f"storage_path={storage}", f"name={name}", f"seed={seed}", f"num_samples={trials}",
                               f"base.schedule.steps={steps}", "base.eval.every=5", "base.checkpoint.every=5",
                               "base.logging.every=5", "scheduler.grace_period=5", "scheduler.reduction_factor=3",
                               "base.data.max_documents=30", f"search={'tpe' if tpe_asha else 'random'}",
                               f"early_stopping={'true' if tpe_asha else 'false'}"])
    output = run_sweep(space)
    data = collect(output.sweep_dir, space)
    trials_data = sorted(data["trials"], key=lambda t: t["started"])
    return {"best": output.best_metric, "steps": sum(t["steps"] for t in trials_data), "trials": trials_data}


def steps_to_reach(trials: list[dict], target: float) -> float | None:
    spent, best = 0, float("inf")
    for t in trials:
        spent += t["steps"]
        if t["best"] is not None:
            best = min(best, t["best"])
        if best <= target:
            return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="raystack-sweep-bench-")
    print(f"{args.trials} trials x {args.steps} steps per arm; tiny model; seeds {args.seeds}")
    print(f"{'seed':>4} {'random best':>12} {'random steps':>13} {'TPE+ASHA best':>14} {'TPE+ASHA steps':>15} "
          f"{'steps to reach random best':>27}")
    ratios = []
    for seed in args.seeds:
        random_arm = arm(storage, seed, args.trials, args.steps, tpe_asha=False)
        smart = arm(storage, seed, args.trials, args.steps, tpe_asha=True)
        reach = steps_to_reach(smart["trials"], random_arm["best"])
        ratio = reach / random_arm["steps"] if reach is not None else None
        ratios.append(ratio)
        shown = f"{reach} ({ratio:.2f}x of random)" if reach is not None else "not reached"
        print(f"{seed:>4} {random_arm['best']:>12.4f} {random_arm['steps']:>13} {smart['best']:>14.4f} "
              f"{smart['steps']:>15} {shown:>27}")
    reached = [r for r in ratios if r is not None]
    summary = f"{statistics.median(reached):.2f}x" if reached else "n/a"
    print(f"median compute TPE + ASHA needed to reach random search's best loss: {summary} of random search's "
          f"({len(reached)}/{len(ratios)} seeds reached it)")
    ray.shutdown()


if __name__ == "__main__":
    main()
