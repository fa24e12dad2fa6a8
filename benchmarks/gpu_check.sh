#!/usr/bin/env bash
# The GPU check, in one command, for a lent CUDA machine: at most 9 minutes (the steps' limits add up to 540 s; it has
# never run on a GPU, so how much of each limit a step uses is not known):
#
#     bash benchmarks/gpu_check.sh OUTDIR            # on the GPU machine, from the repository root
#     bash benchmarks/gpu_check.sh OUTDIR --smoke    # anywhere, CPU, tiny sizes: checks this script (CI runs it)
#
# In order, each step under its own time limit, each step's output in OUTDIR (8 files at most, the device tool's
# limit on what comes back), a failed step reported and the next one run:
#   1. pytest.log        the CUDA tests: pytest -k "triton or compile or fft" (smoke: only collected)
#   2. gpu.md            benchmarks/gpu.py: models eager and compiled, reparameterized inference, one layer per backend
#   3. triton_sweep.md,  benchmarks/triton_sweep.py: Triton launch settings per smpconv_t stage shape, forward,
#      triton_configs.json  input gradient and kernel gradient, timed with CUDA events; the faster ones as JSON
#   4. gpu_tuned.md      benchmarks/gpu.py again (eager) with those settings (TIMM_SMPCONV_TRITON_CONFIGS)
#   5. train.log         torchrun --nproc_per_node=1 train_imagenet.py --model smpconv_t --amp --amp-dtype bfloat16
#                        --channels-last on a generated 224 px ImageFolder: eager, stopped after 2 of 3 epochs and
#                        continued with --resume auto; then --torchcompile for 2 epochs
#   6. cifar10.md        benchmarks/cifar10.py --minutes 0.3 on the real CIFAR-10 archive, where it was carried
#   gpu_check.log        the environment (GPU, driver, versions), every step's command, status and time
#
# The device image has its own torch and Triton but not timm 1.0.31 or fvcore: `bash benchmarks/gpu_wheels.sh` (here,
# with internet) downloads the wheels it lacks into .whl/, and this script installs them from there when present.
# The CIFAR-10 archive: `mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/`. Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl", ".gpu"], timeout_s=600)
# (.whl/ and .gpu/ are ignored by git; docs/performance.md, "On a GPU").
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--smoke]}
smoke=0
[ "${2:-}" = "--smoke" ] && smoke=1
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 && [ $smoke = 0 ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$log" 2>&1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "# gpu_check $(date -u +%FT%TZ) smoke=$smoke"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $py - <<'EOF'
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
import timm
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if cuda else None}, "
      f"Triton {tv}, timm {timm.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}")
EOF
} >> "$log" 2>&1

step() {  # step NAME SECONDS OUTFILE COMMAND...: run with a time limit, output to OUTFILE, status to the log
    local name=$1 limit=$2 file=$3
    shift 3
    [ $smoke = 1 ] && limit=$((limit * 4))  # a CPU, perhaps shared: room for the smoke run
    local t0=$SECONDS
    echo "## $name: $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$file" 2>&1
    local rc=$?
    local status=ok
    [ $rc = 124 ] || [ $rc = 137 ] && status="stopped at its ${limit}s limit"
    [ $rc != 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
    echo "## $name: $status, $((SECONDS - t0)) s" >> "$log"
    echo "$name: $status, $((SECONDS - t0)) s"
}

if [ $smoke = 1 ]; then
    unset TRITON_INTERPRET  # (the test suite's setting: only the sweep runs Triton's interpreter, on its own)
    gpu_args=(--device cpu --smoke --models smpconv_mobile31 smp_flexnet_16 --compile-backend aot_eager)
    step tests 70 "$out/pytest.log" $py -m pytest -q --collect-only -k "triton or compile or fft" -p no:cacheprovider
else
    gpu_args=(--models smpconv_t convnext_tiny smp_flexnet_16 flexnet_16)  # the goals' models
    step tests 70 "$out/pytest.log" $py -m pytest -q -x -k "triton or compile or fft" -p no:cacheprovider
fi
step gpu.py 150 "$out/gpu.log.tmp" $py benchmarks/gpu.py "${gpu_args[@]}" --out "$out/gpu.md"
step triton_sweep 70 "$out/sweep.log.tmp" $py benchmarks/triton_sweep.py --out "$out" $([ $smoke = 1 ] && echo --smoke)
if [ $smoke = 1 ]; then  # the settings file is one the kernels take
    TIMM_SMPCONV_TRITON_CONFIGS="$out/triton_configs.json" step triton-settings 30 "$out/gpu.log.tmp" \
        $py -c "from timm_smpconv.ops import triton_dwconv as k; print(len(k._CONFIGS), 'settings read')"
elif grep -q '"' "$out/triton_configs.json" 2> /dev/null; then  # settings found: the models again, eager, with them
    TIMM_SMPCONV_TRITON_CONFIGS="$out/triton_configs.json" \
        step gpu.py-tuned 40 "$out/gpu.log.tmp" $py benchmarks/gpu.py --no-compile --models smpconv_t convnext_tiny \
        --out "$out/gpu_tuned.md"
fi

# the trainer on a generated ImageFolder (random images: a run of the machinery, not of accuracy)
data=$(mktemp -d)
$py - "$data" $smoke <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, smoke = Path(sys.argv[1]), sys.argv[2] == '1'
size, per_class = (32, 8) if smoke else (224, 64)
rng = np.random.default_rng(0)
for split, n in (('train', per_class), ('validation', per_class // 4)):
    for c in range(4):
        d = root / split / f'class{c}'
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f'{i}.jpg')
EOF
if [ $smoke = 1 ]; then
    train=(--device cpu --model smpconv_mobile31 --img-size 32 -b 8 --workers 0
           --model-kwargs "channels=[8,16,16,16]" "layers=[1,1,1,1]" "kernel_sizes=[7,5,3,3]" small_kernel_size=3)
    launch=($py)
else
    train=(--model smpconv_t --amp --amp-dtype bfloat16 --channels-last -b 32 --workers 8)
    launch=($py -m torch.distributed.run --standalone --nproc_per_node=1)
fi
common=(--data-dir "$data" --num-classes 4 --warmup-epochs 1 --output "$out/runs" "${train[@]}")
step train-eager 45 "$out/train.log" "${launch[@]}" train_imagenet.py "${common[@]}" --epochs 3 --stop-epoch 2 --experiment eager
step train-resume 25 "$out/train.log" "${launch[@]}" train_imagenet.py "${common[@]}" --epochs 3 --resume auto --experiment eager
grep -q 'Epoch 2:' "$out/train.log" || echo "## train: the resumed run did not reach its last epoch" >> "$log"
if [ $smoke = 0 ]; then
    step train-compiled 75 "$out/train.log" "${launch[@]}" train_imagenet.py "${common[@]}" --epochs 2 --torchcompile --experiment compiled
fi
rm -rf "$data" "$out/runs"

archive=.gpu/cifar10-jpeg.tar.gz
[ $smoke = 1 ] && [ ! -f $archive ] && archive=../shared/data/cifar10-jpeg.tar.gz
if [ -f $archive ]; then
    if [ $smoke = 1 ]; then
        step cifar10 65 "$out/cifar10.log.tmp" $py benchmarks/cifar10.py --smoke --data $archive --out "$out/cifar10.md"
    else
        step cifar10 65 "$out/cifar10.log.tmp" $py benchmarks/cifar10.py --minutes 0.3 --data $archive --out "$out/cifar10.md"
    fi
else
    echo "## cifar10: skipped, no $archive (copy ../shared/data/cifar10-jpeg.tar.gz into .gpu/ and carry it)" >> "$log"
fi
# the scripts' own output goes into the log: keeps what comes back within 8 files
for f in "$out"/*.log.tmp; do [ -f "$f" ] && { echo "### $(basename "$f" .log.tmp) output"; cat "$f"; } >> "$log" && rm "$f"; done
grep -E '^## [^:]+: (ok|failed|stopped|skipped)' "$log"
