"""``python -m raystack.kernels``: build the fused CPU ops ahead of time (``make install`` runs it)."""

import logging
import sys

from raystack import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
op = kernels.decode_attention() and kernels.decode_layers() and kernels.sample_rows()
print(f"raystack CPU kernels: {'ready in ' + str(kernels.build_dir()) if op else 'not available'}")
sys.exit(0 if op is not None or not kernels.enabled() else 1)
