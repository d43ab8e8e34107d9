#!/usr/bin/env bash
# The training call's one command on the device machine (plan: gpu/README.md).
#
#   bash gpu/train.sh
#
# assembles the staged parts (gpu/stage.py assemble), makes icmem importable without a network,
# pretrains with gpu/config.json in bf16 at a large batch until the wall-clock guard sends
# SIGTERM (train() then finishes its step and checkpoints), exports the ICAE in bf16 and leaves
# in $OUT: export/ (the ICAE checkpoint), metrics.jsonl, summary.json and train.log.
#
# Knobs (environment):
#   GPU_BUDGET_S=520          seconds for this whole script (the call needs a little more)
#   GPU_EXPORT_RESERVE_S=60   seconds kept for the export after training has to be over
#   GPU_STOP_GRACE_S=45       after SIGTERM, seconds to finish the step and checkpoint, then KILL
#   GPU_REHEARSAL=1|guard     shrink the config for a CPU rehearsal (gpu/stage.py REHEARSAL)
#   GPU_PYTHON=python3        the interpreter (the device's python3 holds torch)
#   GPU_INSTALL=auto          how icmem is made importable: tree | pip | bare (auto: in order)
#   GPU_STAGE, GPU_ROOT       where the parts are / where they are assembled
#   GPU_CONFIG                the TrainConfig (default gpu/config.json)
#   OUT                       results (default gpu/out)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGE=${GPU_STAGE:-$REPO/gpu/stage}
ROOT=${GPU_ROOT:-$STAGE/device}
OUT=${OUT:-$REPO/gpu/out}
PY=${GPU_PYTHON:-python3}
BUDGET=${GPU_BUDGET_S:-520}
RESERVE=${GPU_EXPORT_RESERVE_S:-60}
GRACE=${GPU_STOP_GRACE_S:-45}
CONFIG=${GPU_CONFIG:-$REPO/gpu/config.json}
T0=$(date +%s)

elapsed() { echo $(($(date +%s) - T0)); }
log() { echo "[train.sh +$(elapsed)s] $*"; }

main() {
    mkdir -p "$OUT" "$ROOT"
    log "repo $REPO, stage $STAGE, root $ROOT, out $OUT, budget ${BUDGET}s"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" --version

    # 1. Parts -> model, corpus, gguf library (verified by SHA-256).
    local t=$(elapsed)
    if ! timeout 150 "$PY" "$REPO/gpu/stage.py" assemble --stage "$STAGE" --root "$ROOT"; then
        log "assemble failed: see above (missing parts must be carried again)"
        return 3
    fi
    local assemble_s=$(($(elapsed) - t))

    # 2. icmem importable: a symlink tree of the package-dir mapping, else an offline editable
    #    install, else the bare checkout (enough for training: icmem.icae needs no store).
    export ICMEM_HOME="$ROOT/home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    export TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
    local check='import importlib.util as u, icmem, icmem.icae.train, icmem.models
assert u.find_spec("icmem.store") is not None, "icmem.store is missing"
print("icmem from", icmem.__path__[0])'
    local mode="" want=${GPU_INSTALL:-auto}
    if [[ $want == auto || $want == tree ]] &&
        "$PY" "$REPO/gpu/stage.py" pkgtree --repo "$REPO" --dest "$ROOT/pkg" &&
        (cd "$ROOT" && PYTHONPATH="$ROOT/pkg:$ROOT/site" "$PY" -c "$check"); then
        mode=symlink-tree
        export PYTHONPATH="$ROOT/pkg:$ROOT/site"
    elif [[ $want == auto || $want == pip ]] &&
        (cd "$REPO" && timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation \
            --no-index -e . >"$ROOT/pip.log" 2>&1 || { tail -5 "$ROOT/pip.log"; false; }) &&
        (cd "$ROOT" && PYTHONPATH="$ROOT/site" "$PY" -c "$check"); then
        mode=pip-editable
        export PYTHONPATH="$ROOT/site"
    elif [[ $want == auto || $want == bare ]] &&
        (cd "$ROOT" && PYTHONPATH="$REPO:$ROOT/site" "$PY" -c "import icmem.icae.train"); then
        mode=bare-checkout
        export PYTHONPATH="$REPO:$ROOT/site"
    else
        log "icmem cannot be imported"
        return 4
    fi
    log "icmem via $mode"

    # 3. The config (shrunk for a rehearsal), resumed if a run of this machine left checkpoints.
    if [ -n "${GPU_REHEARSAL:-}" ]; then
        "$PY" "$REPO/gpu/stage.py" rehearsal-config --config "$CONFIG" \
            --out "$ROOT/config-rehearsal.json" --mode "$GPU_REHEARSAL" || return 5
        CONFIG="$ROOT/config-rehearsal.json"
    fi
    local resume=()
    if compgen -G "$ROOT/run/checkpoints/step-*/trainer.pt" >/dev/null; then
        resume=(--resume)
        log "resuming the run in $ROOT/run"
    fi

    # 4. Train under the guard: SIGTERM at the deadline, KILL $GRACE s later.
    local train_s=$((BUDGET - RESERVE - GRACE - $(elapsed)))
    if [ "$train_s" -lt 30 ]; then
        log "only ${train_s}s left for training; not starting"
        return 6
    fi
    local monitor=""
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
            --format=csv,noheader -l 15 >"$ROOT/gpu-usage.csv" 2>/dev/null &
        monitor=$!
    fi
    log "training for at most ${train_s}s (SIGTERM then), config $CONFIG"
    t=$(elapsed)
    (cd "$ROOT" && timeout --preserve-status --signal=TERM --kill-after="${GRACE}s" "${train_s}s" \
        "$PY" "$REPO/gpu/icmem_cli.py" train pretrain --config "$CONFIG" "${resume[@]}")
    local train_rc=$?
    local train_wall=$(($(elapsed) - t))
    [ -n "$monitor" ] && kill "$monitor" 2>/dev/null
    log "training exited with $train_rc after ${train_wall}s"

    # 5. Export the newest checkpoint in bf16 and bring it back through $OUT.
    local export_rc=1
    local left=$((BUDGET - $(elapsed)))
    if compgen -G "$ROOT/run/checkpoints/step-*/trainer.pt" >/dev/null && [ "$left" -gt 5 ]; then
        t=$(elapsed)
        rm -rf "$ROOT/export" "$OUT/export"
        (cd "$ROOT" && timeout "${left}s" "$PY" "$REPO/gpu/icmem_cli.py" train export \
            --run run --out "$ROOT/export" --dtype bfloat16) &&
            "$PY" "$REPO/gpu/stage.py" pack-out --src "$ROOT/export" --dest "$OUT/export"
        export_rc=$?
        log "export exited with $export_rc after $(($(elapsed) - t))s"
    else
        log "no checkpoint to export (or no time left: ${left}s)"
    fi
    [ -f "$ROOT/run/metrics.jsonl" ] && cp "$ROOT/run/metrics.jsonl" "$OUT/metrics.jsonl"
    "$PY" "$REPO/gpu/stage.py" summary --run "$ROOT/run" --config "$CONFIG" \
        --out "$OUT/summary.json" --gpu-usage "$ROOT/gpu-usage.csv" \
        --set "install=$mode" --set "assemble_s=$assemble_s" --set "train_rc=$train_rc" \
        --set "train_wall_s=$train_wall" --set "export_rc=$export_rc" \
        --set "total_s=$(elapsed)" --set "budget_s=$BUDGET"
    ls -l "$OUT" "$OUT/export" 2>/dev/null
    log "done"
    [ "$export_rc" -eq 0 ]
}

mkdir -p "$OUT"
main "$@" 2>&1 | tee -a "$OUT/train.log"
exit "${PIPESTATUS[0]}"
