"""Helpers for tests that talk to a live server: a tiny random run on disk, a uvicorn server on a free port in
a background thread (`LiveServer`) or `lmforge serve` in a child process (`ServeProcess`), plus the pytest
fixtures built from them.

Use the fixtures from a test module with `import serve_fixtures` and `live_server = serve_fixtures.live_server`
(tests/ is on sys.path under pytest), or the server directly:
`with LiveServer(build_app(run)) as server: OpenAI(base_url=server.url + "/v1", ...)`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from lmforge.config.load import dumps_config, load_config
from lmforge.data.tokenizer import CharTokenizer
from lmforge.model.factory import build_model
from lmforge.run.checkpoints import save_checkpoint
from lmforge.serve.cli import bind, build_app
from lmforge.serve.worker import load_engine
from tests.conftest import PATIENCE

ROOT = Path(__file__).resolve().parent.parent

# Letters (the chat template's markers are capitals), digits, punctuation, space and newline.
# The tests' HTTP client: waits up to PATIENCE for an answer (httpx's own default gives up after 5 s, which a busy
# machine can pass), and opens a connection per request, so no request races a server closing an idle one.
http = httpx.Client(timeout=PATIENCE, limits=httpx.Limits(max_keepalive_connections=0))

CHARS = "".join(sorted(set(string.ascii_letters + string.digits + " .,:;!?'-\n")))

SERVE_MODEL = {"model.n_layer": "1", "model.n_embd": "32", "model.n_head": "2", "model.block_size": "64",
               # A wide initialization: a random model whose greedy output depends on every token of its prompt.
               "model.init_std": "0.3", "train.device": "cpu", "train.precision": "fp32", "train.compile": "false"}


def make_run(run_dir: Path, seed: int = 0, **overrides: str) -> Path:
    """A run directory holding a randomly initialized tiny model (char tokenizer over CHARS), as `train`
    writes one: config.toml, tokenizer.json and one checkpoint."""
    tokenizer = CharTokenizer(CHARS)
    config = load_config(None, {**SERVE_MODEL, "model.vocab_size": str(tokenizer.vocab_size), **overrides})
    torch.manual_seed(seed)
    model = build_model(config.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_config(config))
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, 0, model.state_dict(), [], {"step": 0})
    return run_dir


CLASSIFY_LABELS = ("cat", "dog", "tree")


def make_classify_run(root: Path, **overrides: str) -> Path:
    """A classify run (ROOT/genre) fine-tuned for a few steps from a tiny random run: labels cat, dog, tree."""
    from lmforge.tasks.finetune import finetune_command

    base = make_run(root / "base", **overrides)
    for split in ("train", "val"):
        rows = [{"text": f"the {label} sat on a mat", "label": label} for label in CLASSIFY_LABELS * 3]
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = root / "genre"
    finetune_command(str(base), task="classify", data=str(root / "data"), out=str(out), quiet=True,
                     overrides={"train.max_steps": "4", "train.eval_every": "2", "train.batch_size": "4",
                                "train.device": "cpu"})
    return out


class LiveServer:
    """A uvicorn server for an app on 127.0.0.1 and a free port, in a daemon thread; `url` is its address."""

    def __init__(self, app):
        self.app = app
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + PATIENCE
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=PATIENCE)

    @property
    def engine(self):
        return self.app.state.server.engine


def new_gate(open_: bool = True):
    """An event the engine process can wait on (tests hold the engine still with it)."""
    gate = multiprocessing.get_context("spawn").Event()
    if open_:
        gate.set()
    return gate


def held_engine(gate, pause: float, run: str, device: str, max_batch: int):
    """`load_engine` for the engine process of `build_app(..., engine_loader=partial(held_engine, gate, pause))`:
    each forward pass first waits for `gate` (while it is clear, the engine stands still mid-step) and each step
    first sleeps `pause` seconds (a slow engine)."""
    engine = load_engine(run, device, max_batch)

    def hold(module, args) -> None:  # a pre-hook's return value would replace the forward's arguments
        gate.wait(PATIENCE)

    engine.model.register_forward_pre_hook(hold)
    step = engine.step

    def slow_step() -> None:
        time.sleep(pause)
        step()

    engine.step = slow_step
    return engine


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started that are still there (Linux: /proc/PID/task/*/children)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def engine_pid(server_pid: int) -> int:
    """The engine process of the server process `server_pid` (its other child is multiprocessing's resource
    tracker)."""
    (pid,) = [pid for pid in child_pids(server_pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return pid


def gone(pid: int) -> bool:
    """Whether no process `pid` exists any more (neither running nor a zombie waiting to be reaped)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / "tiny-served")


@pytest.fixture(scope="module")
def live_server(served_run):
    """One server for a test module: the tiny run, 4 batch slots, small limits that the error tests reach."""
    app = build_app(served_run, device="cpu", max_batch=4, max_tokens_limit=200, max_body_bytes=20_000)
    with LiveServer(app) as server:
        yield server


class ServeProcess:
    """`lmforge serve RUN --port 0 --device cpu FLAGS` in a child process, as a user starts it; its stderr (the
    server's log) goes to a file, read with `log()`. Entering waits for the line naming the address."""

    def __init__(self, run: Path, log_path: Path, *flags: str):
        self.command = [sys.executable, "-m", "lmforge", "serve", str(run), "--port", "0", "--device", "cpu", *flags]
        self.log_path = log_path
        self.url = ""

    def __enter__(self) -> ServeProcess:
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                            env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + PATIENCE
        while " on http://" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.url = self.log().split(" on ")[1].split()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)
