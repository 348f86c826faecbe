"""Replace the model a running app serves, with gates, a watch and automatic rollback (raystack.rollout).

    python jobs/rollout.py --model ~/raystack_runs/raystack-tiny-v2/model [--app llm] [--watch-s 60]
    ray job submit --working-dir . -- python jobs/rollout.py --model s3://bucket/runs/exp2/model

Exits 0 when the new model serves, 1 when a gate refused it or the watch rolled it back (the history file says why).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["rollout", *sys.argv[1:]]))
