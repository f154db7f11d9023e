"""`lmforge bench`: time real training steps of a config on random tokens, and report MFU.

The step timed is the trainer's own engine, made by the same `build_engine` (same accumulation, precision,
compile and optimizer), so what this measures is what `train` will do, minus data loading from disk.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from lmforge.config.sections import Config
from lmforge.hardware import PeakFlops, configure_fast_math, peak_memory_mb, synchronize
from lmforge.model.factory import build_model
from lmforge.model.spans import corrupt_spans
from lmforge.train.engine import build_engine, engine_device
from lmforge.train.language import accumulation_steps

DEFAULT_BENCH_VOCAB = 50257  # GPT-2's, for configs that take their vocabulary from the data
PROBE_STEPS = 2  # one-micro-batch steps run before the estimate; the last one is timed


def bench(config: Config, steps: int = 10, warmup: int = 2, say: Callable[[str], None] | None = None,
          measure_peak: bool = False) -> dict:
    """Run `warmup` untimed then `steps` timed optimizer steps; returns the measurements. Before them, `say`
    hears how many micro-batches that is and about how long it will take. `measure_peak` measures the peak
    FLOP rate again and replaces the cached one; "mfu" is None where the peak is unknown (see PeakFlops)."""
    config = copy.deepcopy(config)
    train = config.train
    if config.model.vocab_size == 0:
        config.model.vocab_size = DEFAULT_BENCH_VOCAB
    device, precision = engine_device(config)
    configure_fast_math(device)
    torch.manual_seed(train.seed)
    model = build_model(config.model).to(device)
    engine = build_engine(config, model, device, precision, say=say)
    accumulation = accumulation_steps(config)
    shape = (train.batch_size, config.model.block_size + 1)
    windows = torch.randint(0, config.model.vocab_size, shape, device=device)

    def next_batch():
        if config.model.arch == "encoder-decoder":  # its batches are a source, a decoder input and a target
            return corrupt_spans(windows[:, :-1], config.model)
        return windows[:, :-1], windows[:, 1:]

    def run(count: int, micro_steps: int = accumulation) -> None:
        for _ in range(count):
            engine.step(next_batch, micro_steps, train.grad_clip)

    tokens_per_step = accumulation * train.batch_size * config.model.block_size
    if say is not None:
        micro_batches = (steps + warmup) * accumulation
        say(f"{accumulation} micro-batch{'es' * (accumulation > 1)} of {train.batch_size} x {config.model.block_size} "
            f"tokens per step (train.tokens_per_step {tokens_per_step:,}); {steps} timed + {warmup} warm-up steps = "
            f"{micro_batches:,} micro-batches")
        seconds = _time_one_micro_step(run, device)
        fewer = "; a smaller --train.tokens_per_step runs fewer" if accumulation > 1 else ""
        # The probe's step includes one optimizer update, which the real steps share among their micro-batches.
        say(f"estimate: one micro-batch and its update took {seconds * 1000:.1f} ms, so up to about "
            f"{_duration(seconds * micro_batches)} in all" + fewer)
    run(warmup)  # compilation, allocator and thread-pool warm-up stay out of the timing
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_s = steps * tokens_per_step / seconds
    flops = model.flops_per_token() * tokens_per_s
    peak = PeakFlops(device, precision, replace=measure_peak)
    mfu = peak.mfu(flops)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "precision": precision, "engine": train.engine, "compile": engine.compiled, "params": model.num_params(),
        "tokens_per_step": tokens_per_step, "accumulation": accumulation, "steps": steps,
        "ms_per_step": 1000 * seconds / steps, "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
        "peak_tflops": peak.value / 1e12, "mfu": mfu, "peak_mem_mb": peak_memory_mb(device),
    }


def _time_one_micro_step(run: Callable[..., None], device: torch.device) -> float:
    """Seconds of one optimizer step over a single micro-batch, after one untimed (compilation) step."""
    run(PROBE_STEPS - 1, 1)
    synchronize(device)
    start = time.perf_counter()
    run(1, 1)
    synchronize(device)
    return time.perf_counter() - start


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
