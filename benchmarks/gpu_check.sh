#!/usr/bin/env bash
# Issue 13's GPU checks in one run, for a CUDA machine held for a few minutes (the device tool's H200: its python3
# has PyTorch with CUDA, Triton, transformers, pytest and hypothesis, and no Ray, which nothing here needs).
#
#   bash benchmarks/gpu_check.sh        # from the repository root; logs go to $OUT (the device tool's) or ./gpu-check
#
# Parts, each with its own time limit (together at most 8.5 minutes, 9 with the kill grace):
#   env          the GPU, driver, PyTorch, CUDA and Triton versions;
#   tests        the tests of the GPU paths, on the GPU: the Triton sampler against the reference sampler
#                (test_sampling_triton), CUDA-graph capture and replay against the eager step (test_decode_graphs),
#                and the engine's correctness tests (test_engine: batched == alone, stop strings never leak,
#                cancellation frees the slot) on CUDA with CUDA graphs: float32 where a row's tokens alone and
#                batched are compared, bf16 (CUDA's default) elsewhere, and bf16 batched == alone up to a near-tie;
#   graphs       benchmarks/decode_graphs.py: the decode step and the engine with CUDA graphs against eager, and
#                the engine over slots that chats left spread, with Engine.pack_slots on and off;
#   sampling     benchmarks/sampling.py --cuda-only: the Triton kernel against the sort-based sampler on the GPU.
# A part that fails or runs out of time is reported and the next one runs. Exit status 0 only when all passed.
# PYTHON picks the interpreter (default python3). Without a CUDA GPU the script stops at once (exit 2).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HOME=${GPU_CHECK_HOME:-$(mktemp -d)}  # Triton's and PyTorch's caches: never the user's home
# The CPU decode op (raystack.kernels) is not what this checks, and building it would take minutes of the lease:
# the tests' CPU variants run the same step in PyTorch ops.
export RAYSTACK_CPU_KERNELS=0

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA GPU visible to $py (torch.cuda.is_available() is False, or torch is missing): nothing to check" >&2
    exit 2
fi

failed=()
part() {  # part NAME SECONDS COMMAND...: run, log to $out/NAME.log, note a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { failed+=("$name (exit $rc$([ "$rc" = 124 ] && echo ', out of time'))"); echo "=== $name: exit $rc"; }
}

part env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \"$py\" -c \"
import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())\""
part tests 240 "$py" -m pytest -q -p no:cacheprovider \
    tests/unit/test_sampling_triton.py tests/unit/test_decode_graphs.py tests/unit/test_engine.py
part graphs 150 "$py" benchmarks/decode_graphs.py --repeats 2
part sampling 90 "$py" benchmarks/sampling.py --cuda-only --repeats 3

if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all parts passed; logs in $out/"
