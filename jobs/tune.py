"""Sweep the training job's hyperparameters with Ray Tune + Optuna (TPE) + ASHA.

    python jobs/tune.py --config tune_spaces/gpt_tiny.yaml [--set num_samples=12 ...]
    ray job submit --working-dir . -- python jobs/tune.py --config tune_spaces/gpt_gpu.yaml

Re-running with the same sweep name resumes it. Prints the best trial, the exported artifact and the dashboard.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
