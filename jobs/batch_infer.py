"""Batch inference over a parquet table with Ray Data.

    python jobs/batch_infer.py --model ARTIFACT --input IN.parquet --output OUT_DIR [--mode score] [--set k=v ...]
    ray job submit --working-dir . -- python jobs/batch_infer.py --model s3://.../model --input s3://.../in/ ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
