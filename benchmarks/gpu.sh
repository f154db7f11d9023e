#!/usr/bin/env bash
# Single-GPU speed of the torch engine (issue 5): GPT-2 124M and ~350M at block 1024 in bf16 with
# torch.compile, each at the largest micro-batch that fits (tried from large to small), one micro-batch per
# step; then a 2-step check that CUDA training (bf16) starts from the same loss as the CPU (fp32).
# Prints one table and the check; benchmarks/RESULTS.md records them with the GPU, date and torch version.
#
# Usage, from the repository root after `make install`:  benchmarks/gpu.sh [STEPS]
# Targets on an H100: >= 45% MFU for 124M, >= 50% for 350M.
set -euo pipefail
LMFORGE=${LMFORGE:-.venv/bin/lmforge}
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${1:-20}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

$PYTHON -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}')"
echo "| config | micro-batch | ms/step | tokens/s | MFU | peak memory (MB) |"
echo "|---|---:|---:|---:|---:|---:|"
for config in gpt2-124m gpt2-350m; do
  for batch in 64 48 32 24 16 8 4; do
    if result=$($LMFORGE bench --config "configs/$config.toml" --train.batch_size "$batch" --train.tokens_per_step 0 \
                --train.device cuda --train.precision bf16 --train.compile true --steps "$STEPS" --json 2>"$WORK/err")
    then
      $PYTHON -c "import json, sys; r = json.loads(sys.argv[1]); print(f\"| $config | $batch | {r['ms_per_step']:.1f} | \
{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_mb']:,.0f} |\")" "$result"
      break
    fi
    grep -qi "out of memory" "$WORK/err" || { cat "$WORK/err" >&2; exit 1; }  # only running out of memory is expected
  done
done

# Same seed, same data, same initial weights: the first loss on the GPU (bf16) matches the CPU's (fp32).
$LMFORGE prepare --source README.md --tokenizer char --val-fraction 0.1 --workers 1 --out "$WORK/data" --quiet
for device in cpu cuda; do
  precision=$([ "$device" = cpu ] && echo fp32 || echo bf16)
  $LMFORGE train --config configs/shakespeare-char.toml --data "$WORK/data" --out "$WORK/$device" --quiet \
    --max-steps 2 --train.device "$device" --train.precision "$precision" --train.eval_every 0 --train.log_every 1 \
    --model.block_size 64 --train.batch_size 8
done
$PYTHON - "$WORK" <<'PY'
import json, sys
def first_loss(run):
    return next(r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{run}/log.jsonl")) if r.get("step") == 1
                and r["kind"] == "train")
cpu, cuda = first_loss("cpu"), first_loss("cuda")
ok = abs(cpu - cuda) <= 0.01 * cpu  # bf16 keeps about 3 significant digits
print(f"first loss: cpu fp32 {cpu:.5f}, cuda bf16 {cuda:.5f}, difference {abs(cpu - cuda):.5f}: {'same' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
PY
