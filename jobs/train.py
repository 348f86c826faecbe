"""Train the GPT on Ray Train and export a model artifact.

    python jobs/train.py [--config FILE] [--set key=value ...]                      # a local Ray starts by itself
    ray job submit --working-dir . -- python jobs/train.py --config configs/...     # unchanged on a cluster
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working_dir holds raystack/ under ray job submit

from raystack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
