"""The end-to-end demo behind `make demo`: train, sweep, serve and batch-infer on a local Ray (or a cluster).

    python jobs/demo.py [--storage-path ~/raystack_runs] [--train-steps 1200] [--sweep-trials 6] [--batch-rows 64]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
