#!/usr/bin/env bash
# The GPU check: the same trainer on CUDA as on CPU, on the machine's own torch. Runs the
# tiny preset (tiny-base from $AQN_CACHE_DIR) for a few steps on cuda (baseline, AQN, rollout
# NVFP4 + npu-like numerics, QeRL's quantized policy + LoRA) and the baseline on the same
# machine's cpu; prints seconds per step, the cpu/cuda ratio, mismatch and accuracy.
# Usage: AQN_CACHE_DIR=<dir with tiny-base> bench/gpu_check.sh [steps]   (OUT: results dir)
set -euo pipefail
STEPS=${1:-10}
OUT=${OUT:-/tmp/aqn-gpu-check}
PY=${PY:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
$PY - <<PYEOF
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
run() {  # name device overrides...
  local name=$1 device=$2; shift 2
  $PY -m aqn.cli train tiny trainer.device="$device" trainer.total_training_steps="$STEPS" \
    trainer.test_freq="$STEPS" trainer.save_freq=0 trainer.progress_bar=false \
    trainer.default_local_dir="$OUT/runs" trainer.experiment_name="$name-$device" "$@" \
    > "$OUT/$name-$device.log" 2>&1 || { echo "FAILED $name-$device"; tail -20 "$OUT/$name-$device.log"; }
}
run baseline cpu  # the same machine's CPU: the peer for the speed ratio
run baseline cuda
run aqn cuda aqn=qerl
run hw cuda actor_rollout_ref.rollout.quantization=nvfp4 actor_rollout_ref.rollout.numerics=npu-like aqn=qerl
run qerl cuda actor_rollout_ref.actor.quantization=nvfp4 actor_rollout_ref.actor.lora.rank=16 \
  actor_rollout_ref.actor.lora.trainable_norms=true actor_rollout_ref.actor.optim.lr=5e-4 aqn=qerl
$PY - "$OUT/runs" <<'PYEOF'
import json, sys, statistics
from pathlib import Path
root = Path(sys.argv[1])
print(f"{'run':<10} {'cpu s/step':>10} {'cuda s/step':>11} {'cpu/cuda':>8} {'|dlogp| mean cuda':>18} {'val acc cpu':>11} {'val acc cuda':>12}")
for name in ("baseline", "aqn", "hw", "qerl"):
    row = {}
    for dev in ("cpu", "cuda"):
        f = root / f"{name}-{dev}" / "metrics.jsonl"
        if not f.exists():
            row[dev] = None; continue
        rows = [json.loads(l) for l in f.read_text().splitlines()]
        steps = [r for r in rows if "timing_s/step" in r][1:]  # first step warms up
        acc = [r[k] for r in rows for k in r if k.endswith("acc/mean@1")]
        row[dev] = (statistics.median(r["timing_s/step"] for r in steps),
                    statistics.mean(r["rollout_corr/abs_logp_diff_mean"] for r in steps), acc[-1])
    c, g = row["cpu"], row["cuda"]
    fmt = lambda x, f: "-" if x is None else format(x, f)
    print(f"{name:<10} {fmt(c and c[0], '10.3f')} {fmt(g and g[0], '11.3f')} "
          f"{fmt(c and g and c[0] / g[0], '8.2f')} {fmt(g and g[1], '18.5f')} "
          f"{fmt(c and c[2], '11.3f')} {fmt(g and g[2], '12.3f')}")
PYEOF
