"""Deploy the OpenAI-compatible LLM app on Ray Serve.

    python jobs/deploy.py --model ~/raystack_runs/raystack-tiny/model [--config serve_apps/llm.yaml] [--set k=v]
    ray job submit --working-dir . -- python jobs/deploy.py --model s3://bucket/runs/exp/model --set num_gpus=1

Locally (a Ray it started itself) it serves until Ctrl-C; under ray job submit it deploys and exits, leaving the
app running on the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["deploy", *sys.argv[1:]]))
