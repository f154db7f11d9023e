"""Benchmark `lmforge prepare`: throughput and peak memory on a generated text corpus, per tokenizer.

    python benchmarks/prepare.py [--size-mb 200] [--tokenizers char bpe] [--workers N] [--keep DIR]
                                 [--layout files|one-file|one-line]

The corpus is the 42 Shakespeare works, copied until it reaches --size-mb megabytes (10^6 bytes) as
one .txt file per work and copy (--layout one-file: all of it in one .txt file, one document; one-line: that
file with every newline a space, the worst case for a tokenizer that is handed whole lines).
Each copy shuffles the lines of about half the speeches, with its own
seed, and starts with its copy number: text-like, and no copy is an exact duplicate that the cleaning
would drop. Each run is a fresh process, so its peak memory is its own: the peak resident set of the
prepare process (from wait4, which also covers children it reaped), and the peak sum over the process
and all its descendants (the encoding workers), sampled from /proc every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from lmforge.data.corpus import CorpusStats, read_texts, resolve_source

CHILD = """
import json, sys
from lmforge.data.prepare import prepare
corpus, out, kind, workers = sys.argv[1:5]
meta = prepare([corpus], out, kind, vocab_size=4096 if kind == "bpe" else None, quiet=True,
               workers=int(workers) if workers != "0" else None, overwrite=True)
print(json.dumps({split: part["tokens"] for split, part in meta["splits"].items()}))
"""


def make_corpus(directory: Path, size_mb: float, layout: str = "files") -> int:
    """Write perturbed copies of the Shakespeare works until size_mb is reached; returns the bytes."""
    works = [(path.stem, text) for path, text in zip(resolve_source("shakespeare").paths,
                                                     read_texts(resolve_source("shakespeare"), "text",
                                                                CorpusStats()), strict=True)]
    written, copy = 0, 0
    while written < size_mb * 1e6:
        rng = random.Random(copy)
        folder = directory / f"copy{copy:04d}"
        folder.mkdir(parents=True)
        for name, text in works:
            speeches = text.split("\n\n")
            for index, speech in enumerate(speeches):
                if rng.random() < 0.5:
                    lines = speech.split("\n")
                    rng.shuffle(lines)
                    speeches[index] = "\n".join(lines)
            data = (f"Copy {copy}\n\n" + "\n\n".join(speeches)).encode("utf-8")
            (folder / f"{name}.txt").write_bytes(data)
            written += len(data)
            if written >= size_mb * 1e6:
                break
        copy += 1
    if layout != "files":
        files = sorted(directory.rglob("*.txt"))
        with open(directory / "corpus.txt", "wb") as whole:
            for path in files:
                data = path.read_bytes()
                whole.write(data.replace(b"\n", b" ") if layout == "one-line" else data)
                path.unlink()
        for folder in directory.iterdir():
            if folder.is_dir():
                folder.rmdir()
    return written


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            found.extend(int(child) for child in children)
            todo.extend(int(child) for child in children)
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_prepare(corpus: Path, out: Path, kind: str, workers: int) -> dict:
    """Run prepare in a fresh process: seconds, tokens, and peak memory."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(corpus), str(out), kind, str(workers)],
                               stdout=subprocess.PIPE, text=True)
    peak_tree = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not done.is_set():
            pids = [process.pid] + _descendants(process.pid)
            peak_tree = max(peak_tree, sum(_rss_bytes(pid) for pid in pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"prepare with {kind} failed (exit {process.returncode})")
    tokens = json.loads(output.strip().splitlines()[-1])
    # ru_maxrss is in kilobytes on Linux
    return {"seconds": seconds, "tokens": sum(tokens.values()), "peak_main": usage.ru_maxrss * 1024,
            "peak_tree": peak_tree}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, nproc {os.cpu_count()}, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="corpus size in MB (10^6 bytes)")
    parser.add_argument("--tokenizers", nargs="+", default=["char", "bpe"], choices=["char", "bpe", "gpt2"])
    parser.add_argument("--workers", type=int, default=0, help="encoding workers (0: all cores)")
    parser.add_argument("--layout", default="files", choices=["files", "one-file", "one-line"],
                        help="a file per work and copy, all in one file, or one file of one line")
    parser.add_argument("--keep", help="keep the corpus and outputs in this directory (default: a temp dir)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmforge-bench-prepare-"))
    try:
        corpus = root / "corpus"
        if corpus.exists():
            shutil.rmtree(corpus)
        started = time.perf_counter()
        size = make_corpus(corpus, args.size_mb, args.layout)
        files = sum(1 for _ in corpus.rglob("*.txt"))
        print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}")
        generated = time.perf_counter() - started
        print(f"# corpus: {size / 1e6:.1f} MB in {files} files, generated in {generated:.1f} s; "
              f"workers: {args.workers or os.cpu_count()}; layout: {args.layout}")
        print(f"{'tokenizer':<10} {'MB':>8} {'tokens':>14} {'seconds':>9} {'MB/s':>7} {'peak RSS MB':>12} "
              f"{'peak RSS all MB':>16}")
        for kind in args.tokenizers:
            result = run_prepare(corpus, root / f"out-{kind}", kind, args.workers)
            print(f"{kind:<10} {size / 1e6:>8.1f} {result['tokens']:>14,} {result['seconds']:>9.1f} "
                  f"{size / 1e6 / result['seconds']:>7.2f} {result['peak_main'] / 1e6:>12.0f} "
                  f"{result['peak_tree'] / 1e6:>16.0f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
