"""What a GGUF type costs in quality: validation loss (nats/token) of a run computed by llama.cpp on its f32, f16
and q8_0 exports, beside lmforge's own loss on the same windows. Run it alone (it uses every core it is given).

    python benchmarks/gguf_quality.py RUN --data DATA_DIR [--windows 64] [--dtypes f32,f16,q8_0] [--threads N]

The windows are the first --windows non-overlapping windows of the context length (block_size + 1 tokens) of
the validation split; each is evaluated from an empty cache, every position scored (llama-cpp-python's
logits_all), so lmforge's number is `lmforge eval`'s on the same windows. llama.cpp runs as users run it (its
default f16 key/value cache); the f32 line shows what that alone costs. The q8_0 line's "cost" (against f32) is
what issue 19 bounds: 0.02 nats/token on the demo model.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import list_shards, read_shard
from lmforge.infer.load import load_run
from lmforge.interop.gguf import DTYPES, export_gguf


def validation_windows(data: Path, length: int, count: int) -> list[np.ndarray]:
    shards = list_shards(data, "val")
    if not shards:
        sys.exit(f"no validation shards in {data} (prepare with --val-fraction above 0)")
    tokens = np.concatenate([read_shard(path) for path in shards]).astype(np.int64)
    windows = [tokens[start : start + length] for start in range(0, len(tokens) - length + 1, length)][:count]
    if not windows:
        sys.exit(f"the validation split of {data} holds fewer than {length} tokens")
    return windows


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token loss in nats of float64 log-softmax rows."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_probabilities[np.arange(len(targets)), targets].mean())


def lmforge_loss(run: Path, windows: list[np.ndarray]) -> float:
    loaded = load_run(run)
    vocab = loaded.config.model.vocab_size
    losses = []
    with torch.no_grad():
        for window in windows:
            logits, _ = loaded.model(torch.from_numpy(window[None, :-1]))
            losses.append(cross_entropy(logits[0, :, :vocab].numpy(), window[1:]))
    return float(np.mean(losses))


def llama_cpp_loss(path: Path, windows: list[np.ndarray], context: int, threads: int) -> float:
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, n_threads=threads,
                  verbose=False)
    losses = []
    for window in windows:
        model.reset()
        model.eval(window[:-1].tolist())
        losses.append(cross_entropy(np.array(model.scores[: len(window) - 1]), window[1:]))
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the prepared data directory the run trained on")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    context = load_run(args.run).config.model.block_size
    windows = validation_windows(args.data, context + 1, args.windows)
    reference = lmforge_loss(args.run, windows)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in dtypes:
            path = export_gguf(args.run, Path(folder) / f"{dtype}.gguf", dtype=dtype).path
            rows.append((dtype, path.stat().st_size, llama_cpp_loss(path, windows, context, args.threads)))
    f32 = dict((dtype, loss) for dtype, _, loss in rows).get("f32")
    print(f"# gguf_quality: {args.run} on {len(windows)} validation windows of {context} tokens; "
          f"{platform.node()}, {platform.processor() or platform.machine()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.2f}")
    print(f"lmforge (torch, fp32): {reference:.5f} nats/token\n")
    print("| gguf | size (MB) | llama.cpp loss (nats/token) | vs lmforge | cost vs f32 |")
    print("|---|---:|---:|---:|---:|")
    for dtype, size, loss in rows:
        cost = f"{loss - f32:+.5f}" if f32 is not None else "n/a"
        print(f"| {dtype} | {size / 1e6:.2f} | {loss:.5f} | {loss - reference:+.5f} | {cost} |")


if __name__ == "__main__":
    main()
