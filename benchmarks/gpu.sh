#!/usr/bin/env bash
# The GPU benchmark set in one go (about 8 minutes on one H100 80GB), most important first:
#   1. e2e.py     whole 5B pipeline, 49x480x720 bf16, 4 steps, no offload / text-encoder offload / model offload / sequential offload
#                 / the memory plan's choice, each with the plan's predicted peak next to max_memory_reserved
#   1b. pytest -m gpu   the opt-in GPU tests (offload exactness on CUDA, the plan's prediction never below the measurement)
#   2. step.py    one guided 5B step at 49x480x720 bf16, ours vs diffusers, eager
#   3. vae.py     VAE decode of 49x480x720, ours vs diffusers, tiled and untiled
#   4. load.py    loading a 5B checkpoint (random weights, published shards) onto the GPU, ours vs diffusers
#   5. step.py    the same step, both sides torch.compile'd (last: compilation alone takes minutes)
# Each item runs under its own time limit, cut to what is left of the total budget (--budget-s, default 470 s);
# an item that fails or runs out of time is reported and the next one still runs. The figures are appended to
# benchmarks/RESULTS.md; with --out DIR (default: $OUT when set, as on the lent GPU machines) RESULTS.md and the
# logs are copied there too, so that they come back from a remote machine.
#
#   benchmarks/gpu.sh                         # on the GPU machine
#   benchmarks/gpu.sh --cpu-smoke             # the same sequence on the CPU at tiny sizes (~2-3 min), no RESULTS
#   benchmarks/gpu.sh --wheels benchmarks/wheels --only e2e,step
#
# Packages. The library needs einops, safetensors, sentencepiece, huggingface_hub, numpy, imageio, tqdm, Pillow;
# the reference side needs diffusers, transformers, accelerate and protobuf. Whatever is missing is installed:
# from --wheels DIR (or $COGVIDEOX_WHEELS) with `pip --no-index` when that folder exists (machines without a
# package index), else from the index. torch is never installed or replaced: a constraint pins the one present.
# Prepare the wheel folder on a machine with an index, for the GPU machine's Python and platform:
#
#   pip download --dest benchmarks/wheels --only-binary=:all: --python-version 3.11 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       diffusers==0.42.1 transformers==5.24.0 accelerate protobuf einops safetensors sentencepiece \
#       huggingface_hub numpy "imageio>=2.31" imageio-ffmpeg tqdm Pillow
#   rm -f benchmarks/wheels/torch-* benchmarks/wheels/nvidia_* benchmarks/wheels/triton-*
#
# (`pip wheel --wheel-dir benchmarks/wheels ...` works too when the Python versions match.) Delete the torch,
# nvidia-* and triton wheels that accelerate's dependency on torch pulls in: they are gigabytes, and a torch wheel
# from the wrong index (the CPU build from download.pytorch.org/whl/cpu, or a CUDA build for another driver) must
# never replace the GPU machine's own CUDA build. Keep the folder out of git (it is ~40 MB) and carry it to the
# machine with the working tree.
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python || command -v python3)}
SMOKE=0
WHEELS=${COGVIDEOX_WHEELS:-}
BUDGET=470
OUTDIR=${OUT:-}
ONLY="e2e,gputests,step,vae,load,compile"
STEPS=4

while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --wheels) WHEELS=$2; shift ;;
        --budget-s) BUDGET=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
START=$(date +%s)
LOGDIR=$(mktemp -d -t cogvideox-gpu-XXXXXX)
SUMMARY=$LOGDIR/summary.txt
echo "logs: $LOGDIR"

note() { echo "[gpu.sh $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# ------------------------------------------------------------------------------------------------ machine
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import platform, torch
print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"GPU {torch.cuda.get_device_name()}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("no CUDA device")
EOF
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "no CUDA device: run on a GPU machine, or pass --cpu-smoke to test this script on the CPU"
    exit 1
fi

# ------------------------------------------------------------------------------------------------ packages
missing() {  # import names -> the pip names of those that do not import
    local pairs=("$@") out=()
    for pair in "${pairs[@]}"; do
        "$PY" -c "import ${pair%%=*}" 2>/dev/null || out+=("${pair#*=}")
    done
    echo "${out[@]:-}"
}
install() {
    [ $# -eq 0 ] && return 0
    local constraint=$LOGDIR/constraints.txt
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraint"
    if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
        note "installing from $WHEELS (no index): $*"
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" -c "$constraint" "$@"
    else
        note "installing from the package index: $*"
        # A machine without network fails fast here (one retry, 10 s socket timeout) instead of eating the budget.
        timeout 180 "$PY" -m pip install -q --retries 1 --timeout 10 -c "$constraint" "$@"
    fi
}
LIB=$(missing einops=einops safetensors=safetensors sentencepiece=sentencepiece huggingface_hub=huggingface_hub \
    numpy=numpy imageio=imageio imageio_ffmpeg=imageio-ffmpeg tqdm=tqdm PIL=Pillow)
# shellcheck disable=SC2086
install $LIB || note "could not install the library's dependencies ($LIB)"
REF=$(missing diffusers=diffusers==0.42.1 transformers=transformers==5.24.0 accelerate=accelerate \
    google.protobuf=protobuf)
# shellcheck disable=SC2086
install $REF || note "could not install the reference ($REF): the side-by-side benchmarks will fail"
HAVE_REF=1
"$PY" -c "import diffusers, transformers" 2>/dev/null || HAVE_REF=0

# ------------------------------------------------------------------------------------------------ the runs
if [ "$SMOKE" = 1 ]; then
    DEV=(--device cpu)
    E2E=(benchmarks/e2e.py "${DEV[@]}" --tiny --steps 2 --no-results)
    STEP=(benchmarks/step.py "${DEV[@]}" --layers 1 --frames 1 --height 32 --width 32 --text-len 16 --repeats 1
          --no-memory --no-results)
    VAE=(benchmarks/vae.py "${DEV[@]}" --latent-frames 3 --height 32 --width 32
         --repeats 1 --no-record)
    LOAD=(benchmarks/load.py "${DEV[@]}" --model CogVideoX-2b --repeats 1 --no-results)
    LIMITS=(e2e=120 gputests=120 step=120 vae=240 load=240 compile=240)
else
    DEV=(--device cuda)
    E2E=(benchmarks/e2e.py "${DEV[@]}" --model CogVideoX-5b --steps "$STEPS")
    STEP=(benchmarks/step.py "${DEV[@]}" --model CogVideoX-5b --repeats 4)
    VAE=(benchmarks/vae.py "${DEV[@]}" --repeats 1)
    LOAD=(benchmarks/load.py "${DEV[@]}" --model CogVideoX-5b --repeats 1)
    LIMITS=(e2e=170 gputests=100 step=90 vae=110 load=120 compile=240)
fi
GPUTESTS=(-m pytest -q -p no:cacheprovider -m gpu tests)

limit_of() { for pair in "${LIMITS[@]}"; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done; }
FAILED=()
run_item() {  # name, command...
    local name=$1; shift
    case ",$ONLY," in *",$name,"*) ;; *) return 0 ;; esac
    if [ "$HAVE_REF" = 0 ] && [ "$name" != e2e ]; then
        note "$name: skipped (diffusers/transformers not importable)"; FAILED+=("$name:no-reference"); return 0
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit
    limit=$(limit_of "$name")
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        note "$name: skipped (${left}s of the ${BUDGET}s budget left)"; FAILED+=("$name:no-time"); return 0
    fi
    note "$name: start (limit ${limit}s): $PY $*"
    local t0=$(date +%s) rc=0
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$@" > "$LOGDIR/$name.log" 2>&1 || rc=$?
    tail -n 25 "$LOGDIR/$name.log"
    if [ "$rc" = 0 ]; then
        note "$name: done in $(($(date +%s) - t0))s"
    else
        note "$name: FAILED (exit $rc after $(($(date +%s) - t0))s; 124 = out of time); log $LOGDIR/$name.log"
        FAILED+=("$name:exit-$rc")
    fi
}

run_item e2e "${E2E[@]}"
run_item gputests "${GPUTESTS[@]}"
run_item step "${STEP[@]}"
run_item vae "${VAE[@]}"
run_item load "${LOAD[@]}"
run_item compile "${STEP[@]}" --compile

note "total $(($(date +%s) - START))s; failed: ${FAILED[*]:-none}"
if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR"
    cp "$LOGDIR"/*.log "$LOGDIR/summary.txt" "$OUTDIR"/ 2>/dev/null
    cp benchmarks/RESULTS.md "$OUTDIR"/RESULTS.md
    echo "copied logs and RESULTS.md to $OUTDIR"
fi
[ ${#FAILED[@]} -eq 0 ]
