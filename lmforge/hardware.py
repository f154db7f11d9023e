"""Which device and precision to run on, and the peak FLOP rate MFU is measured against."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.files import user_cache_dir, write_atomic

FLOPS_CACHE = "peak_flops.json"
MEASURE_TRIALS = 3

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def resolve_device(name: str, option: str = "--train.device") -> torch.device:
    """The torch device for a device setting; `option` is the flag that set it, named in errors."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} is cuda but no CUDA device is available; use {option} cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} is mps but MPS is not available; use {option} cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown {option} '{name}'; choose auto, cpu, cuda or mps")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a `train.precision` choice (checked by lmforge/config/) means on this device."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return name


def resolve_compile(setting: bool | None, device: torch.device) -> bool:
    """train.compile: None (auto) compiles on CUDA only, where it pays for its start-up time."""
    return device.type == "cuda" if setting is None else setting


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_fast_math(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024,
                         seconds: float = 0.3, trials: int = MEASURE_TRIALS) -> float:
    """FLOP/s of square matmuls on this device: the reference for MFU where no data-sheet peak is known. The
    fastest matmul of `trials` separate bursts, each `seconds` long, counts: other work on a shared machine
    slows some of them down, and an average over them would read low (and MFU high, past 100%); separate bursts
    give a passing load a chance to leave."""
    generator = torch.Generator(device=device).manual_seed(0)  # not the global RNG: resume must stay exact
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up: thread pools, kernel selection
    synchronize(device)
    fastest = math.inf
    for trial in range(trials):
        if trial:
            time.sleep(seconds / 2)  # let the other work on the machine have its turn
        deadline = time.perf_counter() + seconds
        while math.isinf(fastest) or time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            synchronize(device)
            fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest


def peak_flops(device: torch.device, precision: str, *, above: float = 0.0, replace: bool = False) -> float:
    """The FLOP/s that 100% MFU means here: data-sheet bf16 peak for known GPUs, else measured and cached per
    device, torch version, precision and thread count. A cached peak is measured again when it is not above
    `above` (a rate a step actually achieved: the peak was measured while the machine was busy), keeping the
    better of the two; `replace` measures again and keeps the new measurement (lmforge bench --measure-peak)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops if precision != "fp32" else flops / 2
        dtype, size = (torch.bfloat16 if precision != "fp32" else torch.float32), 8192
    else:
        name, dtype, size = _cpu_name(), torch.float32, 1024
    key = f"{device.type} {name} | torch {torch.__version__} | {precision} | {torch.get_num_threads()} threads"
    path = user_cache_dir() / FLOPS_CACHE
    cache = _read_cache(path)
    cached = float(cache[key]) if isinstance(cache.get(key), (int, float)) and cache[key] > 0 else 0.0
    if cached > above and not replace:
        return cached
    measured = measure_matmul_flops(device, dtype, size)
    cache[key] = measured if replace else max(measured, cached)
    try:
        write_atomic(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home: measure again next time rather than fail a run over MFU
    return cache[key]


class PeakFlops:
    """The peak MFU is measured against, for `devices` devices alike. An achieved rate above the cached peak
    means the peak was measured on a busy machine: it is measured again, once, and an MFU that would still be
    above 100% is reported as unknown (None), never as more than 1."""

    def __init__(self, device: torch.device, precision: str, devices: int = 1, *, replace: bool = False):
        self.device, self.precision, self.devices = device, precision, devices
        self.value = peak_flops(device, precision, replace=replace) * devices
        self.remeasured = replace

    def mfu(self, achieved: float) -> float | None:
        """Model FLOP utilisation of an achieved rate (FLOP/s over all devices), or None if the peak is unknown."""
        if achieved > self.value and not self.remeasured:
            self.remeasured = True
            self.value = peak_flops(self.device, self.precision, above=achieved / self.devices) * self.devices
        return achieved / self.value if achieved <= self.value else None


def _read_cache(path: Path) -> dict:
    """The cached measurements; a missing, unreadable or corrupt file is an empty cache (measured again)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on the device: free GPU memory on CUDA, MemAvailable (Linux) on the CPU;
    None where it cannot be known (MPS, a CPU without /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocator peak on CUDA, resident set size high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SMALL_DECODE_WIDTH = 512  # the widest model whose decoding runs on one intra-op thread by default


@contextlib.contextmanager
def decoding_threads(requested: int | None, width: int, device: torch.device) -> Iterator[int]:
    """Within the block, torch's intra-op threads (process-wide) are the ones to decode with, and the block gets
    their number: `requested` (--threads), else one on a CPU for a model at most SMALL_DECODE_WIDTH wide, else
    torch's default (one per physical core). The count before is restored after.

    Why one: decoding multiplies one row per request (up to --max-batch rows) by each weight matrix; for a small
    model such a product takes microseconds, less than waking a second thread costs, and the second thread then
    competes for the cores with the server's event loop (on a 2-core machine decode-sized products measured 2-4x
    faster on 1 thread than on 2). A wide model's products are big enough to share out."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise UserError(f"--threads must be a positive number of threads, got {requested!r}")
    before = torch.get_num_threads()
    if requested is not None:
        torch.set_num_threads(requested)
    elif device.type == "cpu" and width <= SMALL_DECODE_WIDTH:
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
