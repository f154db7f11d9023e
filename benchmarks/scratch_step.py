"""One full training step (forward, backward, clipped AdamW) at the GPT-2 124M shape, scratch vs torch engine.

12 layers, 12 heads, 768 wide, vocabulary 50257 (padded to 50304 as the torch engine pads), batch 4 x 64
tokens, float32, on the CPU. Each engine runs in a child process of its own, so that its peak resident
memory is its own; both use `lmforge.bench.bench` (the step `lmforge train` takes, on random tokens).
Prints one table: ms per step, GFLOP/s achieved, peak memory, and the scratch / torch ratios.

    python benchmarks/scratch_step.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPE = {"model.vocab_size": "50257", "model.block_size": "64", "model.n_layer": "12", "model.n_head": "12",
         "model.n_embd": "768", "train.batch_size": "4", "train.device": "cpu", "train.precision": "fp32",
         "train.compile": "false", "train.grad_clip": "1.0"}


def measure(engine: str, steps: int) -> dict:
    from lmforge.bench import bench
    from lmforge.config.load import load_config

    return bench(load_config(None, {**SHAPE, "train.engine": engine}), steps=steps, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per engine (after one warm-up step)")
    parser.add_argument("--child", choices=("torch", "scratch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return
    results = {}
    for engine in ("torch", "scratch"):
        out = subprocess.run([sys.executable, __file__, "--child", engine, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True).stdout
        results[engine] = json.loads(out.strip().splitlines()[-1])
    print(f"GPT-2 124M shape ({results['torch']['params']:,} parameters), batch 4 x 64 tokens, float32, "
          f"{args.steps} timed steps after 1 warm-up")
    print(f"{'engine':<8} {'ms/step':>9} {'GFLOP/s':>9} {'peak MB':>9}")
    for engine, r in results.items():
        print(f"{engine:<8} {r['ms_per_step']:>9.0f} {r['tflops'] * 1000:>9.1f} {r['peak_mem_mb']:>9.0f}")
    scratch, torch_ = results["scratch"], results["torch"]
    print(f"scratch / torch: time {scratch['ms_per_step'] / torch_['ms_per_step']:.2f}x, "
          f"peak memory {scratch['peak_mem_mb'] / torch_['peak_mem_mb']:.2f}x")


if __name__ == "__main__":
    main()
