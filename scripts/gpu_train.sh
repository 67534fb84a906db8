#!/usr/bin/env bash
# Train several lungburden models side by side on one CUDA GPU (the lent device machine), with the
# case generation spread over the CPU cores first. Writes each run's best checkpoint and log to
# $OUT (or ./gpu-out). The recipe is the documented one of docs/training.md; only --device cuda
# and the number of epochs the time budget allows differ from the CPU runs.
#
#   PHANTOMS=400 VARIANTS=16 BUDGET=6.5 WORKERS=15 DEVICE=cuda REAL_CT=.devdata/real-ct scripts/gpu_train.sh
#
# RUNS_LIST names the runs (default "l4 l4w unet3d", session 3); EPOCHS (optional) caps each run's
# epochs besides the time budget (e.g. the epochs the CPU recipe gets in its hour):
#   l3      the shipped recipe: ConvLSTM levels=3, lstm_pool=1, Adam lr 2e-3, bfloat16 autocast
#   l3b4    the same with --high-opacity-boost 4 (l3b10: 10)
#   l3f32   l3 in float32 (does bfloat16 training cost accuracy?)
#   l4      ConvLSTM levels=4, width 24, from Kaiming initialisation, Adam lr 2e-3
#   l4w     the same at width 32
#   unet3d  the UNet3D baseline of Table 4
#   ft-l4   fine-tune of the levels=4 width-24 checkpoint $INIT (Adam lr $FT_LR, default 5e-4)
#   ft-l4s  the same at a smaller learning rate ($FT_LR_SMALL, default 2e-4)
# Session 12 screen (all bfloat16, --high-opacity-boost 10, Adam lr 2e-3 like the shipped recipe):
#   s5      the shipped command itself (160 phantoms + 8 variants, 150 epochs) with --seed 5
#   d400    the shipped network on $PHANTOMS / $VARIANTS cases for the whole budget
#   w24     levels=3 at width 24 (stem, growth, head, ConvLSTM 24; 48 decoded features)
#   w32     the same at width 32 (64 decoded features)
#   h32     the shipped widths with a 32-channel ConvLSTM and 24-channel heads
#   l4b     levels=4 width 24 (the session-3 network) with the shipped recipe
#   c-NAME  continue $INIT_DIR/NAME.pt (a screen run's best checkpoint; its hyperparameters) on the
#           same cases, bfloat16, boost 10, Adam at $FT_LR (session 12: 2e-4, the lr the screen
#           runs had just stepped down to)
# DEADLINE (optional, seconds after the start): the training budget becomes whatever is left of
# it after the case preparation, less 30 s for the copies, so the whole script ends in time.
# THREADS: torch CPU threads per run (default 4).
set -u
OUT=${OUT:-gpu-out}
PHANTOMS=${PHANTOMS:-400}
VARIANTS=${VARIANTS:-16}
BUDGET=${BUDGET:-6.5}
WORKERS=${WORKERS:-15}
DEVICE=${DEVICE:-cuda}
REAL_CT=${REAL_CT:-../shared/data/real-ct}
CACHE=${CACHE:-/tmp/lungburden-gpu-cases}
RUNS=${RUNS:-/tmp/lungburden-gpu-runs}
PY=${PY:-python3}
EPOCH_WINDOWS=${EPOCH_WINDOWS:-512}
EPOCHS=${EPOCHS:-}
DEADLINE=${DEADLINE:-}
THREADS=${THREADS:-4}
RUNS_LIST=${RUNS_LIST:-l4 l4w unet3d}
INIT=${INIT:-}
INIT_DIR=${INIT_DIR:-runs/s12}
FT_LR=${FT_LR:-5e-4}
FT_LR_SMALL=${FT_LR_SMALL:-2e-4}
# Check the run list before the long case preparation.
seen=" "
for run in $RUNS_LIST; do
    case "$run" in
        l4|l4w|unet3d|l3|l3b4|l3b10|l3f32|s5|d400|w24|w32|h32|l4b) ;;
        c-*) [ -f "$INIT_DIR/${run#c-}.pt" ] || { echo "run $run needs $INIT_DIR/${run#c-}.pt"; exit 2; } ;;
        ft-l4|ft-l4s) [ -f "$INIT" ] || { echo "run $run needs INIT=<checkpoint> (got '$INIT')"; exit 2; } ;;
        *) echo "unknown run $run (l4 l4w unet3d l3 l3b4 l3b10 l3f32 ft-l4 ft-l4s)"; exit 2 ;;
    esac
    case "$seen" in *" $run "*) echo "run $run listed twice"; exit 2 ;; esac
    seen="$seen$run "
done
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
started=$(date +%s)
DATA="--phantoms $PHANTOMS --phantom-seed-start 1000 --real-ct $REAL_CT --real-ct-variants $VARIANTS
      --real-ct-seed-start 1000 --cache $CACHE --seed 0 --split-seed 0 --quiet"
# 1. Generate and preprocess every case once, in parallel (no training: --max-epochs 0).
$PY -m lungburden.cli train --final --model convlstm --out "$RUNS/prep" $DATA --max-epochs 0 \
    --workers "$WORKERS" --threads 1 > "$OUT/prep.log" 2>&1 || { echo "case preparation failed"; tail -30 "$OUT/prep.log"; exit 1; }
echo "cases ready after $(( $(date +%s) - started )) s: $(ls "$CACHE" | wc -l) files"
if [ -n "$DEADLINE" ]; then
    BUDGET=$(python3 -c "print(round(max(0.5, ($DEADLINE - ($(date +%s) - $started) - 30) / 60), 2))")
    echo "training budget $BUDGET min"
fi
# 2. The runs, side by side (each its own process and CPU threads; the GPU is shared).
COMMON="$DATA --device $DEVICE --threads $THREADS --slab 16 --batch 32 --windows-per-epoch $EPOCH_WINDOWS
        --val-windows-per-case 12 --optimizer adam --time-budget $BUDGET ${EPOCHS:+--max-epochs $EPOCHS}"
L3="--hparam levels=3 --hparam lstm_pool=1 --lr 2e-3"
L4="--hparam levels=4 --hparam growth=24 --hparam hidden=24 --hparam head_width=24 --hparam lstm_pool=1"
B10="--precision bfloat16 --high-opacity-boost 10"
W24="--hparam width=24 --hparam growth=24 --hparam features=48 --hparam hidden=24 --hparam head_width=24"
W32="--hparam width=32 --hparam growth=32 --hparam features=64 --hparam hidden=32 --hparam head_width=32"
# s5: the shipped command's own data and epochs (docs/training.md), whatever PHANTOMS / VARIANTS say.
SHIPPED_DATA="--phantoms 160 --phantom-seed-start 1000 --real-ct $REAL_CT --real-ct-variants 8
      --real-ct-seed-start 1000 --cache $CACHE --seed 5 --split-seed 0 --quiet --max-epochs 150"
SHIPPED_COMMON="$SHIPPED_DATA --device $DEVICE --threads $THREADS --slab 16 --batch 32 --windows-per-epoch 512
        --val-windows-per-case 12 --optimizer adam --time-budget $BUDGET"
L4W="--hparam levels=4 --hparam growth=32 --hparam hidden=32 --hparam head_width=32 --hparam lstm_pool=1"
run_args() {
    case "$1" in
        l4) echo "--model convlstm $COMMON --lr 2e-3 $L4" ;;
        l4w) echo "--model convlstm $COMMON --lr 2e-3 $L4W" ;;
        l3) echo "--model convlstm $COMMON $L3 --precision bfloat16" ;;
        l3b4) echo "--model convlstm $COMMON $L3 --precision bfloat16 --high-opacity-boost 4" ;;
        l3b10) echo "--model convlstm $COMMON $L3 --precision bfloat16 --high-opacity-boost 10" ;;
        l3f32) echo "--model convlstm $COMMON $L3 --precision float32" ;;
        unet3d) echo "--model unet3d $DATA --device $DEVICE --threads 4 --batch 32 --windows-per-epoch 256
                     --val-windows-per-case 12 --optimizer adam --lr 2e-3 --time-budget $BUDGET" ;;
        s5) echo "--model convlstm $SHIPPED_COMMON $L3 $B10" ;;
        d400) echo "--model convlstm $COMMON $L3 $B10" ;;
        w24) echo "--model convlstm $COMMON $L3 $B10 $W24" ;;
        w32) echo "--model convlstm $COMMON $L3 $B10 $W32" ;;
        h32) echo "--model convlstm $COMMON $L3 $B10 --hparam hidden=32 --hparam head_width=24" ;;
        l4b) echo "--model convlstm $COMMON --lr 2e-3 $L4 $B10" ;;
        c-*) echo "--model convlstm $COMMON $B10 --lr $FT_LR --init $INIT_DIR/${1#c-}.pt" ;;
        ft-l4) echo "--model convlstm $COMMON --lr $FT_LR --init $INIT" ;;
        ft-l4s) echo "--model convlstm $COMMON --lr $FT_LR_SMALL --init $INIT" ;;
        *) return 1 ;;
    esac
}
pids=""
for run in $RUNS_LIST; do
    args=$(run_args "$run")
    # shellcheck disable=SC2086
    $PY -m lungburden.cli train --final --out "$RUNS/$run" $args > "$OUT/$run.log" 2>&1 &
    pids="$pids $!"
done
failed=0
for pid in $pids; do wait "$pid" || failed=$((failed + 1)); done
for run in $RUNS_LIST; do
    if grep -q "stopped after" "$OUT/$run.log"; then
        cp "$RUNS/$run/final/best.pt" "$OUT/$run.pt"
        cp "$RUNS/$run/final/history.json" "$OUT/$run.history.json" 2>/dev/null
    else
        echo "$run: FAILED (no checkpoint copied)"
    fi
    tail -3 "$OUT/$run.log"
done
echo "total $(( $(date +%s) - started )) s; $failed run(s) failed"
exit $(( failed > 0 ))
