#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one call of at most ~8 minutes (perf/README.md, "gpu_check.sh").
#
#   bash perf/gpu_check.sh                 # on a GPU machine, from a checkout (+ .whl/ from perf/build_wheelhouse.sh)
#   bash perf/gpu_check.sh --dry-run       # on a CPU: the same steps at toy sizes, into a temporary folder (CI)
#   bash perf/gpu_check.sh --out DIR --only kernels,bench
#
# Steps, each time-boxed (`timeout`) so a slow or hung one cannot starve the rest:
#   env      what the machine is: GPU, driver, versions, which optional packages import (flash-attn...)
#   kernels  the kernel tests on CUDA in fp32 and bf16, and flash-attn vs SDPA outputs and gradients
#   bench    perf/bench_kernels.py at Mochi's latent (eager, compile, triton; fp32, bf16) and the sweep plus batches of
#            128 and 512 Mochi latents (bf16, eager and triton: the sweep's sizes are launch-bound on an H100, these
#            reach the bandwidth regime; torch.compile per shape would not fit the box); GB/s, fraction of HBM peak
#   profile  perf/profile_step.py --preset mochi at 61x480x848, with gradient checkpointing and without
#   memory   the same step under torch.cuda.set_per_process_memory_fraction emulating 24 and 48 GiB cards
#   pretrain only when named (--only pretrain): launch/pretrain_base.py on CUDA, the recipe of
#            configs/pretrain_synth.yaml plus $PRETRAIN_SET (space-separated section.option=value overrides), the
#            world rendered by all but two cores; the exported base comes back in $OUT (see the end)
# Results: perf/results/<device-name>/ (or --out), a log per step, summary.txt (also printed), and, when $OUT is
# set (the device tool's folder that comes back), one results.tar.gz of them all plus summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0; OUT_DIR=""; ONLY="env,kernels,bench,profile,memory"; SCALE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --time-scale) SCALE="$2"; shift ;;          # multiply every step's time box (a slower or faster machine)
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && [ $DRY = 1 ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# Offline install of what the GPU image lacks (diffusers, webdataset, ...), from perf/build_wheelhouse.sh's .whl/.
if [ $DRY = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${GPU_CHECK_SITE:-/tmp/dr_site}
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    echo "gpu_check.sh: installing the wheelhouse .whl/ failed" >&2; exit 2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEVICE_SLUG="dry-run"
  RES=${OUT_DIR:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
else
  if ! DEVICE_SLUG=$("$PY" -c "import torch, re; assert torch.cuda.is_available(), 'no CUDA'; \
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))" 2>&1); then
    echo "gpu_check.sh: no usable CUDA GPU ($DEVICE_SLUG); on a CPU run --dry-run" >&2; exit 2
  fi
  RES=${OUT_DIR:-perf/results/$DEVICE_SLUG}
fi
mkdir -p "$RES"
SUMMARY="$RES/summary.txt"
: > "$SUMMARY"
START=$(date +%s)

# step NAME SECONDS COMMAND...: run with a time box, log to $RES/NAME.log, one summary line.
step() {
  local name=$1 box=$2; shift 2
  case ",$ONLY," in *",${name%%-*},"*) ;; *) return 0 ;; esac
  box=$("$PY" -c "print(max(5, round($box * $SCALE)))")
  local t0=$(date +%s)
  echo "== $name (time box ${box}s): $*"
  timeout -k 10 "$box" "$@" > "$RES/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  local verdict="ok"
  [ $rc = 124 ] || [ $rc = 137 ] && verdict="TIMED OUT"
  [ $rc != 0 ] && [ "$verdict" = ok ] && verdict="exit $rc"
  local last; last=$(grep -v '^\s*$' "$RES/$name.log" | tail -n 1 | cut -c1-150)
  printf '%-16s %-10s %4ss  %s\n' "$name" "$verdict" "$dt" "$last" | tee -a "$SUMMARY"
}

echo "gpu_check: results in $RES"
step env 30 "$PY" perf/gpu_env.py --out "$RES"

if [ $DRY = 1 ]; then
  # The same scripts at toy sizes on the CPU (Triton in its interpreter): plumbing only, numbers mean nothing.
  step kernels 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_masked_loss.py \
       tests/test_attention.py -k "cpu-fp32 or flash or sdpa" --timeout=100
  step bench 120 "$PY" perf/bench_kernels.py --device cpu --sizes tiny --dtypes fp32 --impls eager,triton \
       --reps 1 --warmup 0 --no-plot --out "$RES"
  step profile-ckpt 120 "$PY" perf/profile_step.py --preset mochi --device cpu --num-layers 1 --frames 7 \
       --height 32 --width 32 --steps 1 --warmup 0 --gradient-checkpointing --no-plot --out "$RES"
  step memory-24gb 120 "$PY" perf/profile_step.py --preset mochi --device cpu --num-layers 2 --frames 7 \
       --height 32 --width 32 --steps 1 --warmup 0 --memory-gb 24 --config configs/memory/24gb.yaml \
       --set model.blocks_to_swap=1 --gradient-checkpointing --no-plot --out "$RES"
else
  step kernels 75 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_masked_loss.py \
       tests/test_kernels_relation_features.py tests/test_kernels_dispatch.py tests/test_attention.py \
       -k "cuda or flash or gpu" --timeout=70 -rs
  step bench-mochi 80 "$PY" perf/bench_kernels.py --sizes mochi --dtypes fp32,bf16 --passes full,fwd,bwd \
       --reps 30 --warmup 3 --no-plot --out "$RES"
  step bench-sweep 60 "$PY" perf/bench_kernels.py --sizes sweep --shape 128,12,11,60,106 --shape 512,12,11,60,106 \
       --dtypes bf16 --impls eager,triton --passes full --reps 20 --warmup 2 --out "$RES"
  step profile-ckpt 95 "$PY" perf/profile_step.py --preset mochi --steps 4 --warmup 1 --gradient-checkpointing \
       --out "$RES"
  step profile-nockpt 60 "$PY" perf/profile_step.py --preset mochi --steps 3 --warmup 1 \
       --no-gradient-checkpointing --out "$RES"
  step memory-48gb 70 "$PY" perf/profile_step.py --preset mochi --steps 2 --warmup 1 --gradient-checkpointing \
       --memory-gb 48 --no-plot --out "$RES"
  step memory-24gb 100 "$PY" perf/profile_step.py --preset mochi --steps 2 --warmup 1 --gradient-checkpointing \
       --memory-gb 24 --config configs/memory/24gb.yaml --no-plot --out "$RES"
fi

# The synth base's recipe on the GPU: every stage, then the export with its checks. The run folder (the encoded
# corpus alone is ~50 MB) stays outside $RES; its curves, metrics and the exported base are copied in.
# PRETRAIN_RUN=/tmp/dr_pretrain makes a second call on the still-warm machine continue a run the time box stopped.
PRE_RUN=""
if [[ ",$ONLY," == *",pretrain,"* ]]; then
  PRE_RUN=${PRETRAIN_RUN:-$(mktemp -d /tmp/dr_pretrain.XXXXXX)}
  PRE_SETS=()
  for kv in ${PRETRAIN_SET:-}; do PRE_SETS+=(--set "$kv"); done
  [ $DRY = 1 ] && PRE_SETS=(--set world.corpus_clips=24 --set vae.steps=2 --set vae.batch_size=1 \
    --set vae.clip_frames=7 --set vae.stats_clips=4 --set decoder.steps=1 --set decoder.batch_size=1 \
    --set decoder.clip_frames=7 --set transformer.steps=2 --set transformer.batch_size=2 --set transformer.heads=2 \
    --set transformer.layers=1 --set text.d_model=32 --set sample.steps=2 --set sample.fidelity_videos=2 \
    --set sample.per_relation=0 "${PRE_SETS[@]}")
  WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  step pretrain 540 "$PY" launch/pretrain_base.py --config configs/pretrain_synth.yaml --set "run.out=$PRE_RUN" \
       --set "run.device=$([ $DRY = 1 ] && echo cpu || echo cuda)" --set "run.workers=$WORKERS" "${PRE_SETS[@]}" \
       --export-to "$PRE_RUN/synth_base"
  mkdir -p "$RES/pretrain"
  for stage in vae corpus transformer decoder; do
    for f in metrics.jsonl loss_curve.png DONE.json; do
      [ -f "$PRE_RUN/$stage/$f" ] && cp "$PRE_RUN/$stage/$f" "$RES/pretrain/${stage}_$f"
    done
  done
  [ -f "$PRE_RUN/synth_base/checks.json" ] && cp "$PRE_RUN/synth_base/checks.json" "$RES/pretrain/checks.json"
fi

echo "total $(( $(date +%s) - START ))s on $DEVICE_SLUG" | tee -a "$SUMMARY"
echo; echo "== summary ($SUMMARY)"; cat "$SUMMARY"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" && cp "$SUMMARY" "$OUT/summary.txt"
  # the exported base: its two large weight files as they are (each < 16 MiB, the tool's limit per file), the rest
  # packed; unpack base.tar.gz and put the two files back to get the diffusers folder
  if [ -n "$PRE_RUN" ] && [ -f "$PRE_RUN/synth_base/model_index.json" ]; then
    cp "$PRE_RUN/synth_base/transformer/diffusion_pytorch_model.safetensors" "$OUT/base_transformer.safetensors"
    cp "$PRE_RUN/synth_base/vae/diffusion_pytorch_model.safetensors" "$OUT/base_vae.safetensors"
    tar -czf "$OUT/base.tar.gz" -C "$PRE_RUN" --exclude='diffusion_pytorch_model.safetensors' synth_base
  fi
fi
# A step that failed is a finding, reported above; the script fails only when it could not run at all.
exit 0
