"""Serving throughput and latency: `lmforge serve` under 1, 4 and 16 concurrent streaming clients beside `lmforge
sample` (in-process generation, one stream) in the same run, the issue's goals as ratios, peers, and a bounded
soak. Loopback only; run it alone (it owns the CPU or GPU while it runs).

    python benchmarks/serve.py RUN [--clients 1,4,16] [--requests 8] [--rounds 3] [--max-tokens 64] [--device auto]
                               [--threads N] [--seeded] [--skip-peers] [--peer llama-cpp --gguf FILE]
                               [--soak 2000]

Each client sends --requests streamed /v1/completions one after another (temperature 1, so answers differ
and rarely stop early; with --seeded each carries a seed, which makes the server decode at its fixed,
batch-invariant shape: the cost of the seed guarantee). Per request: time to first token (TTFT, from sending to
the first text event) and the gaps between text events (inter-token latency: the server sends one event per
token, merging only where a token ends inside a multi-byte character). Aggregate tokens/s is every client's
generated tokens (the `usage` of each stream) over the wall time of the whole level. The clients are aiohttp
(its HTTP parser is C): with httpx's (Python) the clients took 0.34-0.50 ms of CPU per token against aiohttp's
0.16-0.18, on the same two cores as the server (the soak, which times nothing, uses httpx). Also per level: the CPU
milliseconds per generated token of the server's processes (lmforge: the HTTP server and its engine process) and
of this process (the clients; for `sample`, the model itself). On a 2-core machine the clients and the server's
HTTP side share the cores with the model, so where a server's CPU goes is part of what its clients see.

`lmforge sample` is `generate` in this process, at the decoding threads `lmforge sample` would use, --requests
prompts one after another; its tokens/s is one stream's.

Rounds: this machine's speed drifts (a 2-core VM's `sample` moved by up to half within one run), so a ratio of
figures measured minutes apart measures the drift as much as the server. The goals' figures are therefore
measured in --rounds rounds, each round `sample`, then every client level with lmforge serve and the peer server
(both started once, the idle one waiting) back to back; each table row pools its level's rounds, and each ratio
is printed pooled and then per round, so its spread shows. The extra peers (--max-batch 1, transformers) are
context, measured once after the rounds.

The goals of issue 22: 1-client tokens/s >= 0.8x `lmforge sample`'s, 1-client inter-token latency p50 <= 1.25x,
16-client aggregate tokens/s >= 5x one `lmforge sample` stream. The load average (1 minute) is printed before
and after: a number measured on a busy machine is not a result.

Peers, same run, same machine, same prompt and token counts (not with --skip-peers):
- `lmforge serve --max-batch 1`: the same server decoding one request at a time;
- Hugging Face transformers `generate` on `lmforge export RUN --format hf` at batch 1 and at batch 16
  (left-padded prompts of mixed lengths), greedy, exactly --max-tokens new tokens; its TTFT is the time of a
  one-token generate, its inter-token latency (total - TTFT) / (tokens - 1).
- `--peer llama-cpp --gguf FILE`: llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on
  the GGUF export of the same run, under the same client load at every level (goals: at 16 clients lmforge's
  aggregate >= llama.cpp's, at 1 client >= 0.8x). It tokenizes the prompts itself, with the GGUF's tokenizer.

The soak (--soak N, 0 to skip) sends N requests from 64 clients to the batched server: streamed, streamed
and dropped after the first event, non-streamed, and malformed (bad JSON, wrong types, unknown model,
max_tokens above the limit, a prompt longer than the context), and reports the server's 5xx answers, hung
requests (no answer within --hang-seconds), 4xx answers to the malformed ones, and the server's resident
memory before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import httpx

PROMPT_CHOICES = ["ROMEO:", "JULIET:\nO Romeo,", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING HENRY:", "HAMLET:\nTo be, or not", "To be"]


def fitting_prompts(run: str, max_tokens: int) -> list[str]:
    """The prompts that leave room for max_tokens new tokens in the run's context (the server refuses the
    others, and the HF export has no positions beyond it)."""
    from lmforge.config.load import load_config
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.run.checkpoints import resolve_checkpoint

    run_dir, _ = resolve_checkpoint(run)
    context = load_config(run_dir / "config.toml").model.block_size
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    prompts = [text for text in PROMPT_CHOICES if len(tokenizer.encode(text)) + max_tokens <= context]
    if not prompts:
        sys.exit(f"--max-tokens {max_tokens} leaves no room for a prompt in the {context}-token context")
    return prompts


@dataclass
class Level:
    """What one row of the table measured."""

    peer: str
    clients: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: int = 0
    server_cpu: float = float("nan")  # CPU seconds of the server's processes (lmforge: the server and its engine)
    client_cpu: float = float("nan")  # CPU seconds of this process: the clients (or, for sample, the model)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) used so far by a process and every process it started, from /proc (Linux):
    `lmforge serve` is a server process and its engine process."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue
            parents[int(entry.name)] = int(fields[1])
            used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, total = {pid}, 0.0
    for child in sorted(parents):  # children have larger pids than their parents here (no pid wrap-around)
        if child in tree or parents[child] in tree:
            tree.add(child)
            total += used[child]
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """An OpenAI-compatible server started by `command(port)` on a free loopback port, as a subprocess, until
    closed (SIGTERM, then wait); ready once `ready_path` answers 200. `model` is its first /v1/models entry."""

    def __init__(self, command: Callable[[int], list[str]], log: Path, ready_path: str = "/health"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(command(self.port), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"{command(self.port)[2]} exited with {self.process.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            self.close()
            sys.exit(f"the server did not answer {ready_path} within 180 s; see {log}")
        self.model = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def lmforge_server(run: str, max_batch: int, device: str, threads: int | None, log: Path) -> Server:
    """`lmforge serve RUN`."""
    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "lmforge", "serve", run, "--port", str(port), "--max-batch", str(max_batch),
                "--device", device, "--max-queue", "4096", *(["--threads", str(threads)] if threads else [])]
    return Server(command, log)


def llama_cpp_server(gguf: str, context: int, log: Path) -> Server:
    """llama-cpp-python's OpenAI-compatible server on a GGUF file. Without --interrupt_requests False, each new
    request would cut the stream in flight short; its n_threads stays llama.cpp's own default."""
    try:
        import llama_cpp  # noqa: F401  (only to refuse early, with the install line)
    except ImportError:
        sys.exit("--peer llama-cpp needs llama-cpp-python: pip install 'llama-cpp-python[server]'")

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
                str(port), "--n_ctx", str(context), "--interrupt_requests", "False"]
    return Server(command, log, ready_path="/v1/models")


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, level: Level) -> None:
    """One streamed completion, its TTFT and inter-token gaps added to `level`."""
    started = time.perf_counter()
    last = None
    events, usage_tokens = 0, None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            level.errors += 1
            return
        async for line in response.content:  # one server-sent line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if not event.get("choices") or not event["choices"][0].get("text"):
                continue
            events += 1
            now = time.perf_counter()
            if last is None:
                level.ttft.append(now - started)
            else:
                level.gaps.append(now - last)
            last = now
    level.requests += 1
    level.tokens += events if usage_tokens is None else usage_tokens  # a server without usage: count events


async def measure_server(server: Server, peer: str, clients: int, requests: int, max_tokens: int,
                         prompts: list[str], seeded: bool = False) -> Level:
    level = Level(peer, clients)
    connector = aiohttp.TCPConnector(limit=clients + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one_client(index: int) -> None:
            for turn in range(requests):
                body = {"model": server.model["id"], "prompt": prompts[(index + turn) % len(prompts)],
                        "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                        "stream_options": {"include_usage": True}}
                if seeded:
                    body["seed"] = index * 1000 + turn
                await stream_one(session, server.url, body, level)

        server_cpu, client_cpu = tree_cpu_seconds(server.process.pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(one_client(index) for index in range(clients)))
        level.seconds = time.perf_counter() - started
        level.server_cpu = tree_cpu_seconds(server.process.pid) - server_cpu
        level.client_cpu = time.process_time() - client_cpu
    return level


class NoExport(Exception):
    """`lmforge export --format hf` refused the run (e.g. a combination of options HF has no class for)."""


def measure_transformers(run: str, device: str, batch: int, max_tokens: int, prompts: list[str], work: Path
                         ) -> Level:
    """transformers generate on the run's HF export: `batch` prompts, left-padded, exactly max_tokens new.
    Raises NoExport, with export's message, when the run has no HF export."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.hardware import resolve_device
    from lmforge.infer.load import load_run

    export = work / "hf"
    if not export.exists():
        done = subprocess.run([sys.executable, "-m", "lmforge", "export", run, "--format", "hf", "--out", str(export)],
                              capture_output=True, text=True)
        if done.returncode:
            raise NoExport(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "lmforge export failed")
    torch_device = resolve_device(device, "--device")
    model = AutoModelForCausalLM.from_pretrained(export).to(torch_device).eval()
    tokenizer = load_run(run).tokenizer
    batch_ids = [tokenizer.encode(prompts[index % len(prompts)]) for index in range(batch)]
    width = max(len(ids) for ids in batch_ids)
    pad = tokenizer.eot_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids], device=torch_device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=torch_device)

    def timed_generate(new_tokens: int) -> float:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed_generate(2)  # warm-up: first-call allocations and kernel selection
    level = Level(f"transformers generate, batch {batch}", batch)
    for _ in range(3):
        first = timed_generate(1)
        total = timed_generate(max_tokens)
        level.ttft.append(first)
        level.gaps.append((total - first) / max(max_tokens - 1, 1))
        level.requests += batch
        level.tokens += batch * max_tokens
        level.seconds += total
    return level


SAMPLE = "lmforge sample (generate, no server)"


class InProcess:
    """lmforge's own one-prompt generation (what `lmforge sample` runs, at its decoding threads), in this
    process: the latency the server at one client should match. The model is loaded once."""

    def __init__(self, run: str, device: str, threads: int | None):
        import torch

        from lmforge.infer.load import load_run

        self.loaded = load_run(run, device=device)
        self.threads = threads
        self.generator = torch.Generator(device=self.loaded.model.wte.weight.device).manual_seed(0)

    def measure(self, max_tokens: int, prompts: list[str], requests: int) -> Level:
        """`requests` prompts one after another."""
        from lmforge.hardware import decoding_threads
        from lmforge.infer.generate import generate

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        level = Level(SAMPLE, 1)
        with decoding_threads(self.threads, self.loaded.config.model.n_embd, self.loaded.device):
            list(generate(model, tokenizer.encode(prompts[0]), 4, generator=self.generator))  # warm-up
            level.client_cpu = -time.process_time()
            for index in range(requests):
                started = last = time.perf_counter()
                tokens = generate(model, tokenizer.encode(prompts[index % len(prompts)]), max_tokens,
                                  temperature=1.0, generator=self.generator)
                for count, _ in enumerate(tokens):
                    now = time.perf_counter()
                    (level.gaps if count else level.ttft).append(now - last)
                    last = now
                    level.tokens += 1
                level.requests += 1
                level.seconds += last - started
            level.client_cpu += time.process_time()
        return level


MALFORMED = [
    (b"{not json", "application/json"),
    (json.dumps({"prompt": "ROMEO:", "max_tokens": "many"}).encode(), "application/json"),
    (json.dumps({"prompt": 7, "max_tokens": 8}).encode(), "application/json"),
    (json.dumps({"model": "no-such-model", "prompt": "ROMEO:", "max_tokens": 8}).encode(), "application/json"),
    (json.dumps({"prompt": "ROMEO:", "max_tokens": 10**9}).encode(), "application/json"),
]


async def soak(server: Server, requests: int, max_tokens: int, prompts: list[str], hang_seconds: float) -> dict:
    """`requests` mixed requests from 64 clients; counts by outcome, and the server's RSS before and after."""
    context = server.model.get("context_length") or 1024
    malformed = [*MALFORMED, (json.dumps({"prompt": "ab" * context, "max_tokens": 8}).encode(), "application/json")]
    counts = {"5xx": 0, "hung": 0, "4xx_for_malformed": 0, "malformed": 0, "ok": 0, "cancelled": 0,
              "unexpected": 0}
    rng = random.Random(0)
    kinds = rng.choices(["stream", "cancel", "plain", "malformed"], weights=[5, 2, 2, 1], k=requests)
    queue: asyncio.Queue = asyncio.Queue()
    for kind in kinds:
        queue.put_nowait(kind)
    rss_before = rss_mb(server.process.pid)

    async def one(client: httpx.AsyncClient, kind: str) -> None:
        body = {"model": server.model["id"], "prompt": rng.choice(prompts), "max_tokens": max_tokens,
                "temperature": 1.0, "stream": kind in ("stream", "cancel")}
        if kind == "malformed":
            counts["malformed"] += 1
            content, content_type = rng.choice(malformed)
            response = await client.post(f"{server.url}/v1/completions", content=content,
                                         headers={"Content-Type": content_type})
            counts["4xx_for_malformed" if 400 <= response.status_code < 500 else
                   "5xx" if response.status_code >= 500 else "unexpected"] += 1
            return
        if kind == "plain":
            response = await client.post(f"{server.url}/v1/completions", json=body)
            counts["ok" if response.status_code == 200 else
                   "5xx" if response.status_code >= 500 else "unexpected"] += 1
            return
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                counts["5xx" if response.status_code >= 500 else "unexpected"] += 1
                return
            async for line in response.aiter_lines():
                if kind == "cancel" and line.startswith("data: "):
                    counts["cancelled"] += 1
                    return  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    counts["ok"] += 1
                    return
            counts["unexpected"] += 1  # the stream ended without [DONE]

    async def client_loop() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(hang_seconds)) as client:
            while not queue.empty():
                kind = queue.get_nowait()
                try:
                    await asyncio.wait_for(one(client, kind), hang_seconds)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    counts["hung"] += 1
                except httpx.TransportError:
                    counts["unexpected"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(64)))
    seconds = time.perf_counter() - started
    await asyncio.sleep(1.0)  # let dropped streams' slots be freed before the "after" reading
    health = httpx.get(f"{server.url}/health", timeout=10).status_code
    return {**counts, "requests": requests, "seconds": seconds, "health_after": health,
            "rss_before_mb": rss_before, "rss_after_mb": rss_mb(server.process.pid)}


def rate(level: Level) -> float:
    return level.tokens / level.seconds if level.seconds else float("nan")


def row(level: Level, base: Level | None) -> str:
    ratio = f"{rate(level) / rate(base):.2f}x" if base and base.tokens else "-"
    ms = [1000 * percentile(values, q) for values, q in
          ((level.ttft, 0.5), (level.ttft, 0.99), (level.gaps, 0.5), (level.gaps, 0.99))]
    cpu = [1000 * seconds / level.tokens if level.tokens else float("nan")
           for seconds in (level.server_cpu, level.client_cpu)]
    return (f"| {level.peer} | {level.clients} | {level.requests} | {level.tokens} | {rate(level):,.0f} | {ratio} | "
            + " | ".join(f"{value:.1f}" for value in ms) + " | "
            + " | ".join("-" if math.isnan(value) else f"{value:.2f}" for value in cpu) + f" | {level.errors} |")


def pooled(levels: list[Level]) -> Level:
    """One level's measurements of every round, together."""
    total = Level(levels[0].peer, levels[0].clients, server_cpu=0.0, client_cpu=0.0)
    for level in levels:
        total.requests += level.requests
        total.tokens += level.tokens
        total.seconds += level.seconds
        total.ttft += level.ttft
        total.gaps += level.gaps
        total.errors += level.errors
        total.server_cpu += level.server_cpu
        total.client_cpu += level.client_cpu
    return total


def pooled_rounds(rounds: list[dict]) -> dict:
    """Every level's measurements of all rounds, pooled (`pooled`)."""
    return {key: pooled([measured[key] for measured in rounds]) for key in rounds[0]}


def ratio_line(what: str, value: Callable[[dict], float], rounds: list[dict], together: dict, goal: str = "") -> str:
    """A ratio over every round pooled (`together`), then its value in each round (measured minutes apart, each
    side of it within seconds of the other)."""
    each = ", ".join(f"{value(measured):.2f}" for measured in rounds)
    return f"{what}: {value(together):.2f} (rounds: {each}){f'; goal {goal}' if goal else ''}"


def goal_lines(rounds: list[dict], together: dict, server: str, peer: str | None, levels: list[int]) -> list[str]:
    """The goals of issue 22 as ratios (a goal whose client count was not measured is left out)."""
    sample = (SAMPLE, 1)
    lines = []
    if 1 in levels:
        lines.append(ratio_line("1 client tokens/s / lmforge sample",
                                lambda m: rate(m[server, 1]) / rate(m[sample]), rounds, together, ">= 0.8"))
        lines.append(ratio_line("1 client inter-token latency p50 / lmforge sample",
                                lambda m: percentile(m[server, 1].gaps, 0.5) / percentile(m[sample].gaps, 0.5),
                                rounds, together, "<= 1.25"))
    if 16 in levels:
        lines.append(ratio_line("16 clients' aggregate tokens/s / one lmforge sample stream",
                                lambda m: rate(m[server, 16]) / rate(m[sample]), rounds, together, ">= 5"))
    if peer:
        goals = {1: ">= 0.8", 16: ">= 1"}
        for clients in levels:
            lines.append(ratio_line(f"tokens/s at {clients} clients, {server} / {peer}",
                                    lambda m, c=clients: rate(m[server, c]) / rate(m[peer, c]), rounds,
                                    together, goals.get(clients, "")))
    return lines


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=8, help="streamed requests per client per level and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of sample and every server at every level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="--threads for lmforge serve and sample (default: theirs)")
    parser.add_argument("--seeded", action="store_true", help="every request carries a seed (batch-invariant)")
    parser.add_argument("--skip-peers", action="store_true", help="no --max-batch 1 server, no transformers")
    parser.add_argument("--peer", choices=["llama-cpp"], help="a peer server under the same client load")
    parser.add_argument("--gguf", help="the GGUF export of RUN, for --peer llama-cpp (lmforge export)")
    parser.add_argument("--soak", type=int, default=0, help="soak requests (the issue asks 2000); 0 skips it")
    parser.add_argument("--hang-seconds", type=float, default=120.0, help="a soak request taking longer is hung")
    args = parser.parse_args()
    if (args.peer is None) != (args.gguf is None):
        parser.error("--peer llama-cpp and --gguf FILE go together")
    levels = [int(value) for value in args.clients.split(",")]
    prompts = fitting_prompts(args.run, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="lmforge-serve-bench-"))
    load_before = load_average()

    batched, one_at_a_time, llama = "lmforge serve", "lmforge serve --max-batch 1", "llama.cpp server"
    in_process = InProcess(args.run, args.device, args.threads)
    servers = {batched: lmforge_server(args.run, args.max_batch, args.device, args.threads, work / "serve.log")}
    model = servers[batched].model
    rounds: list[dict[tuple[str, int], Level]] = []
    soak_result = None
    try:
        if args.peer:
            servers[llama] = llama_cpp_server(args.gguf, model["context_length"], work / "llama-cpp.log")
        for name, server in servers.items():
            asyncio.run(measure_server(server, name, 1, 1, 4, prompts))  # warm-up: first-call allocations
        for _ in range(args.rounds):
            measured = {(SAMPLE, 1): in_process.measure(args.max_tokens, prompts, args.requests)}
            for clients in levels:
                for name, server in servers.items():
                    measured[name, clients] = asyncio.run(measure_server(server, name, clients, args.requests,
                                                                         args.max_tokens, prompts, args.seeded))
            rounds.append(measured)
        if args.soak:
            soak_result = asyncio.run(soak(servers[batched], args.soak, args.max_tokens, prompts, args.hang_seconds))
    finally:
        for server in servers.values():
            server.close()
    together = pooled_rounds(rounds)
    rows = [row(together[SAMPLE, 1], None)]
    for name in servers:
        rows += [row(together[name, clients], together[name, levels[0]]) for clients in levels]
    ratios = goal_lines(rounds, together, batched, llama if args.peer else None, levels)

    if not args.skip_peers:  # measured once, after the rounds: context, not goals
        server = lmforge_server(args.run, 1, args.device, args.threads, work / "serve-1.log")
        try:
            for clients in levels:
                level = asyncio.run(measure_server(server, one_at_a_time, clients, args.requests, args.max_tokens,
                                                   prompts, args.seeded))
                rows.append(row(level, None))
                ratios.append(f"tokens/s at {clients} clients, batched (all rounds) / --max-batch 1: "
                              f"{rate(together[batched, clients]) / rate(level):.2f}")
        finally:
            server.close()
        for batch in (1, 16):
            try:
                level = measure_transformers(args.run, args.device, batch, args.max_tokens, prompts, work)
            except NoExport as refused:
                ratios.append(f"transformers peer: not measured, the run has no HF export ({refused})")
                break
            rows.append(row(level, None))
            if (batched, batch) in together:
                ratios.append(f"tokens/s, lmforge serve at {batch} clients (all rounds) / transformers batch "
                              f"{batch}: {rate(together[batched, batch]) / rate(level):.2f}")

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, device {args.device}; model {model['id']} (context {model.get('context_length')}), "
          f"{args.max_tokens} new tokens per request, {args.requests} requests per client per round, "
          f"{args.rounds} rounds"
          f"{', seeded' if args.seeded else ''}; load average {load_before} before, {load_average()} after")
    print(f"command: python benchmarks/serve.py {' '.join(sys.argv[1:])}\n")
    print("| server | clients (batch) | requests | tokens | tokens/s | vs 1 client | TTFT p50 ms | TTFT p99 ms "
          "| ITL p50 ms | ITL p99 ms | server CPU ms/token | client CPU ms/token | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if ratios:
        print("\n" + "\n".join(ratios))
    if soak_result:
        print(f"\nsoak: {json.dumps(soak_result)}")


if __name__ == "__main__":
    main()
