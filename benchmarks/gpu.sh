#!/usr/bin/env bash
# The GPU benchmark set in one command, for a bare H100/H200 machine with no network (Python 3.12 and a CUDA torch
# preinstalled), in under 8 minutes, in this order:
#   1. gputests   pytest -m gpu: the opt-in GPU tests (offload exactness on CUDA, the memory plan's prediction never
#                 below the measurement, ...)
#   2. step       step.py: one guided 5B step at 49x480x720 bf16, ours vs diffusers in the same process, eager
#   3. e2e        e2e.py: the whole 5B pipeline (random weights built in memory on the GPU), a few steps
#                 extrapolated to 50, no offload / model offload / sequential offload, ours vs diffusers'
#                 pipe.to / enable_model_cpu_offload / enable_sequential_cpu_offload; peak allocated and reserved
#   4. vae        vae.py: VAE decode of 49x480x720, ours vs diffusers, untiled and tiled
#   5. load       load.py: the 5B transformer folder (random bf16, published 5 GB shards, written once in the
#                 background while the tests run, kept in --cache) onto the GPU, ours vs diffusers
#   6. compile    step.py --compile: the step with both sides torch.compile'd, --compile-layers blocks (compiling
#                 all 42 takes minutes), last
# Each item runs under its own time limit, cut to what is left of the total budget (--budget-s, default 470 s); an
# item that fails or runs out of time is reported, with whatever figures it had written, and the next one runs.
# Each item's figures are printed as soon as it ends; at the end one summary table (every figure the set is judged
# on: measured, target, pass/fail, or why it was not run) goes to stdout and is appended to benchmarks/RESULTS.md
# beside each script's own section. With --out DIR (default: $OUT when set, as on the lent GPU machines)
# RESULTS.md, the summary and a tarball of the logs are copied there after every item.
#
#   benchmarks/gpu.sh                           # on the GPU machine, with the wheels in .whl/
#   benchmarks/gpu.sh --wheels /path/to/wheels  # another wheel folder
#   benchmarks/gpu.sh --cpu-smoke               # the same sequence on the CPU at tiny sizes (< 3 min), no RESULTS
#   benchmarks/gpu.sh --only e2e,step           # a subset
#   benchmarks/gpu.sh --limit e2e=240 --compile-layers 8 --steps 4   # another item limit, more blocks compiled
#
# Packages. Nothing is resolved and torch is never touched: if anything the set needs does not import, each wheel
# of the wheel folder (default .whl/, or --wheels DIR) whose distribution is not installed at that version goes
# into a temporary folder put first on PYTHONPATH, with
#     python3 -m pip install --no-index --no-deps --no-compile --target TMP WHEELS/*.whl
# On a machine where everything imports, nothing is installed. The GPU machines have torch, transformers,
# accelerate, safetensors, sentencepiece, huggingface_hub, einops, numpy, ... but not diffusers; the folder holds
# diffusers and what it lists that they lack (6.4 MB, pure Python). Fill it, on any machine with an index:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
#
# (.whl/ is git-ignored) and carry it with the working tree (on the lent machines: carry: [".whl"]).
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
SMOKE=0
WHEELS=${COGVIDEOX_WHEELS:-$ROOT/.whl}
BUDGET=
OUTDIR=${OUT:-}
ONLY="gputests,step,e2e,vae,load,compile"
STEPS=3
COMPILE_LAYERS=4
CACHE=${COGVIDEOX_BENCH_CACHE:-/tmp/cogvideox-bench}
ORIGINAL_ARGS=("$@")
EXTRA_LIMITS=()

while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --wheels) WHEELS=$2; shift ;;
        --budget-s) BUDGET=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        --compile-layers) COMPILE_LAYERS=$2; shift ;;
        --cache) CACHE=$2; shift ;;
        --limit) EXTRA_LIMITS+=("$2"); shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -z "$BUDGET" ] && { [ "$SMOKE" = 1 ] && BUDGET=165 || BUDGET=470; }
# Paths given relative to where the command was run, before moving to the repository's root.
WHEELS=$(realpath -m "$WHEELS")
CACHE=$(realpath -m "$CACHE")
[ -n "$OUTDIR" ] && OUTDIR=$(realpath -m "$OUTDIR")
cd "$ROOT" || exit 1

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
START=$(date +%s)
LOGDIR=$(mktemp -d -t cogvideox-gpu-XXXXXX)
SUMMARY=$LOGDIR/summary.txt
echo "logs: $LOGDIR"

note() { echo "[gpu.sh $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# ------------------------------------------------------------------------------------------------ machine
MACHINE=$("$PY" - <<'EOF'
import platform, torch
text = f"Python {platform.python_version()}, torch {torch.__version__}"
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    text = f"{torch.cuda.get_device_name()} ({free / 2**30:.0f} of {total / 2**30:.0f} GiB free, CUDA {torch.version.cuda}); {text}"
else:
    text = f"CPU only ({torch.get_num_threads()} threads); {text}"
print(text)
EOF
)
note "machine: $MACHINE"
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "no CUDA device: run on a GPU machine, or pass --cpu-smoke to test this script on the CPU"
    exit 1
fi

# ------------------------------------------------------------------------------------------------ packages
MODULES="diffusers transformers accelerate einops safetensors sentencepiece huggingface_hub numpy imageio tqdm PIL"
missing() {  # the modules of $MODULES that Python cannot find
    "$PY" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" \
        $MODULES
}
MISSING=$(missing)
if [ -n "$MISSING" ]; then
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        # The wheels whose distribution is not installed at that version (a name-version pair from the file name).
        PICK=$("$PY" - "$WHEELS"/*.whl <<'EOF'
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    name, version = os.path.basename(path).split("-")[:2]
    try:
        if md.version(name) == version:
            continue
    except md.PackageNotFoundError:
        pass
    print(path)
EOF
)
        SITE=$LOGDIR/site
        if [ -n "$PICK" ]; then
            note "not importable: $MISSING; installing from $WHEELS (no index, no dependencies) into $SITE:" \
                "$(for w in $PICK; do basename "$w"; done | tr '\n' ' ')"
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
                $PICK || note "pip install failed"
            export PYTHONPATH=$SITE:$PYTHONPATH
        fi
        MISSING=$(missing)
    else
        note "not importable: $MISSING, and no wheels in $WHEELS (see --help for how to fill it)"
    fi
    [ -n "$MISSING" ] && note "still not importable: $MISSING"
fi
HAVE_REF=1
"$PY" -c "import diffusers, transformers" 2>/dev/null || HAVE_REF=0
[ "$HAVE_REF" = 0 ] && note "diffusers/transformers do not import: the items that compare with them are skipped"

# ------------------------------------------------------------------------------------------------ the runs
if [ "$SMOKE" = 1 ]; then
    CKPT=$LOGDIR/checkpoint-tiny
    DEV=(--device cpu)
    STEP=(benchmarks/step.py "${DEV[@]}" --layers 1 --frames 1 --height 32 --width 32 --text-len 16 --repeats 1
          --no-memory --no-results)
    COMPILE=("${STEP[@]}" --compile --compile-backend aot_eager)
    E2E=(benchmarks/e2e.py "${DEV[@]}" --tiny --steps 2 --modes none,model,sequential --no-results)
    VAE=(benchmarks/vae.py "${DEV[@]}" --tiny --latent-frames 2 --height 32 --width 32 --repeats 1 --no-record)
    LOAD=(benchmarks/load.py "${DEV[@]}" --tiny --shard-size 40KB --repeats 1 --no-results)
    LIMITS=(gputests=50 step=40 e2e=40 vae=60 load=40 compile=40)
else
    CKPT=$CACHE/CogVideoX-5b-bf16-5GB
    DEV=(--device cuda)
    STEP=(benchmarks/step.py "${DEV[@]}" --model CogVideoX-5b --repeats 4)
    COMPILE=("${STEP[@]}" --compile --layers "$COMPILE_LAYERS")
    E2E=(benchmarks/e2e.py "${DEV[@]}" --model CogVideoX-5b --steps "$STEPS" --modes none,model,sequential)
    VAE=(benchmarks/vae.py "${DEV[@]}" --repeats 1)
    LOAD=(benchmarks/load.py "${DEV[@]}" --model CogVideoX-5b --shard-size 5GB --repeats 1)
    LIMITS=(gputests=150 step=60 e2e=190 vae=90 load=50 compile=240)
fi
LIMITS+=("${EXTRA_LIMITS[@]}")  # --limit NAME=S: the last pair for a name wins
LOAD+=(--folder "$CKPT")
[ "$HAVE_REF" = 0 ] && E2E+=(--sides ours)
GPUTESTS=(-m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$LOGDIR/gputests.xml" tests)

selected() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
limit_of() {
    local value=
    for pair in "${LIMITS[@]}"; do [ "${pair%%=*}" = "$1" ] && value=${pair#*=}; done
    echo "$value"
}

# The load item's checkpoint, written once, in the background (CPU and disk only) while the first items run.
WRITER=
if selected load && [ ! -f "$CKPT/config.json" ]; then
    note "writing the load item's checkpoint to $CKPT in the background"
    OMP_NUM_THREADS=2 nice -n 10 "$PY" "${LOAD[@]}" --write-only > "$LOGDIR/load-write.log" 2>&1 &
    WRITER=$!
fi

copy_out() {  # RESULTS.md, the summary and a tarball of the logs, to --out (at most a few files come back)
    [ -n "$OUTDIR" ] || return 0
    mkdir -p "$OUTDIR"
    cp benchmarks/RESULTS.md "$OUTDIR/RESULTS.md" 2>/dev/null
    [ -f "$LOGDIR/summary.md" ] && cp "$LOGDIR/summary.md" "$OUTDIR/summary.md"
    tar -czf "$OUTDIR/gpu-logs.tar.gz" -C "$LOGDIR" --exclude=site --exclude='checkpoint-*' . 2>/dev/null
}

FAILED=()
run_item() {  # name, command...
    local name=$1; shift
    if ! selected "$name"; then
        echo "skipped not in --only" > "$LOGDIR/$name.status"; return 0
    fi
    if [ "$HAVE_REF" = 0 ] && [ "$name" != e2e ] && [ "$name" != gputests ]; then
        note "$name: skipped (diffusers/transformers not importable)"
        echo "skipped diffusers not importable" > "$LOGDIR/$name.status"; FAILED+=("$name:no-reference"); return 0
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit
    limit=$(limit_of "$name")
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        note "$name: skipped (${left}s of the ${BUDGET}s budget left)"
        echo "skipped ${left} s of the ${BUDGET} s budget left" > "$LOGDIR/$name.status"; FAILED+=("$name:no-time")
        return 0
    fi
    note "$name: start (limit ${limit}s): $*"
    local t0 rc=0
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$@" > "$LOGDIR/$name.log" 2>&1 || rc=$?
    local took=$(($(date +%s) - t0))
    tail -n 25 "$LOGDIR/$name.log"
    if [ "$rc" = 0 ]; then
        note "$name: done in ${took}s"
        echo "done $took" > "$LOGDIR/$name.status"
    else
        note "$name: FAILED (exit $rc after ${took}s; 124 = out of time); log $LOGDIR/$name.log"
        echo "failed $rc $took" > "$LOGDIR/$name.status"
        FAILED+=("$name:exit-$rc")
    fi
    "$PY" benchmarks/summary.py --logdir "$LOGDIR" --items "$name" | tee -a "$SUMMARY"
    copy_out
}

wait_for_writer() {  # the load item needs the whole checkpoint; waiting counts against the budget
    [ -n "$WRITER" ] || return 0
    local limit waited=0
    limit=$(limit_of load)
    if kill -0 "$WRITER" 2>/dev/null; then
        note "load: waiting for the checkpoint writer"
        while kill -0 "$WRITER" 2>/dev/null && [ "$waited" -lt "$limit" ]; do sleep 1; waited=$((waited + 1)); done
    fi
    if kill -0 "$WRITER" 2>/dev/null; then
        note "load: the checkpoint writer is still running after ${waited}s: stopping it"
        kill "$WRITER" 2>/dev/null
    fi
    wait "$WRITER" 2>/dev/null || note "load: the checkpoint writer failed (log $LOGDIR/load-write.log): load.py writes it"
    tail -n 3 "$LOGDIR/load-write.log"
    WRITER=
}

run_item gputests "${GPUTESTS[@]}"
run_item step "${STEP[@]}" --json "$LOGDIR/step.json"
run_item e2e "${E2E[@]}" --json "$LOGDIR/e2e.json"
run_item vae "${VAE[@]}" --json "$LOGDIR/vae.json"
selected load && wait_for_writer
run_item load "${LOAD[@]}" --json "$LOGDIR/load.json"
run_item compile "${COMPILE[@]}" --json "$LOGDIR/compile.json"
[ -n "$WRITER" ] && kill "$WRITER" 2>/dev/null

note "total $(($(date +%s) - START))s; failed or skipped: ${FAILED[*]:-none}"
COMMAND=benchmarks/gpu.sh
[ ${#ORIGINAL_ARGS[@]} -gt 0 ] && COMMAND+=" $(printf '%q ' "${ORIGINAL_ARGS[@]}")" && COMMAND=${COMMAND% }
SUMMARY_ARGS=(--logdir "$LOGDIR" --machine "$MACHINE" --output "$LOGDIR/summary.md" --command "$COMMAND")
if [ "$SMOKE" = 1 ]; then
    SUMMARY_ARGS+=(--smoke)
else
    SUMMARY_ARGS+=(--append)
fi
"$PY" benchmarks/summary.py "${SUMMARY_ARGS[@]}" | tee -a "$SUMMARY"
copy_out
[ -n "$OUTDIR" ] && echo "copied RESULTS.md, summary.md and gpu-logs.tar.gz to $OUTDIR"
[ ${#FAILED[@]} -eq 0 ]
