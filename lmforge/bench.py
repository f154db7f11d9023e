"""`lmforge bench`: time real training steps of a config on random tokens, and report MFU.

The step timed is the trainer's own `optimizer_step` (same accumulation, precision, compile and
optimizer), so what this measures is what `train` will do, minus data loading from disk.
"""

from __future__ import annotations

import time

import torch

from lmforge.config import Config
from lmforge.model.factory import build_model
from lmforge.train.engine import ScratchEngine, check_engine
from lmforge.train.hardware import (
    configure_fast_math,
    peak_flops,
    peak_memory_mb,
    resolve_compile,
    resolve_device,
    resolve_precision,
    synchronize,
)
from lmforge.train.optim import build_optimizers
from lmforge.train.trainer import accumulation_steps, optimizer_step

DEFAULT_BENCH_VOCAB = 50257  # GPT-2's, for configs that take their vocabulary from the data


def bench(config: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Run `warmup` untimed then `steps` timed optimizer steps; returns the measurements."""
    train = config.train
    if config.model.vocab_size == 0:
        config.model.vocab_size = DEFAULT_BENCH_VOCAB
    check_engine(config)
    scratch = train.engine == "scratch"
    device = torch.device("cpu") if scratch else resolve_device(train.device)
    precision = "fp32" if scratch else resolve_precision(train.precision, device)
    configure_fast_math(device)
    torch.manual_seed(train.seed)
    model = build_model(config.model).to(device)
    engine = ScratchEngine(model, config) if scratch else None
    optimizers = [] if engine else build_optimizers(model, config.optim, device)
    forward = torch.compile(model) if not engine and resolve_compile(train.compile, device) else model
    accumulation = accumulation_steps(config)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    shape = (train.batch_size, config.model.block_size + 1)
    windows = torch.randint(0, config.model.vocab_size, shape, device=device)

    def next_batch():
        return windows[:, :-1], windows[:, 1:]

    def run(count: int) -> None:
        for _ in range(count):
            if engine:
                engine.step(next_batch, accumulation, train.grad_clip)
            else:
                optimizer_step(model, forward, optimizers, next_batch, accumulation, device=device,
                               precision=precision, scaler=scaler, grad_clip=train.grad_clip)

    run(warmup)  # compilation, allocator and thread-pool warm-up stay out of the timing
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_step = accumulation * train.batch_size * config.model.block_size
    tokens_per_s = steps * tokens_per_step / seconds
    flops = model.flops_per_token() * tokens_per_s
    peak = peak_flops(device, precision)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "precision": precision, "engine": train.engine, "compile": forward is not model, "params": model.num_params(),
        "tokens_per_step": tokens_per_step, "steps": steps, "ms_per_step": 1000 * seconds / steps,
        "tokens_per_s": tokens_per_s, "tflops": flops / 1e12, "peak_tflops": peak / 1e12, "mfu": flops / peak,
        "peak_mem_mb": peak_memory_mb(device),
    }
