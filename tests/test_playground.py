"""The playground page (GET /) in a real browser: Playwright drives Debian's chromium through a chat and a
completion streamed from the server, the stop button, the API key, and a classifier's labels; it saves a
screenshot.

Playwright's own browser download is not reachable here, so the test launches the system chromium
(`apt-get install chromium`; .ci/run installs it). Without it, or without the playwright package, the tests
are skipped with a message saying which is missing. LMFORGE_SCREENSHOT=PATH also copies the screenshot to
PATH (the README's docs/img/playground.png).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import lmforge
from lmforge.serve.cli import build_app
from lmforge.tasks.predict import predict
from tests.conftest import PATIENCE
from tests.serve_fixtures import CLASSIFY_LABELS, LiveServer, make_classify_run, make_run

PAGE = Path(lmforge.__file__).parent / "serve" / "static" / "index.html"
API_KEY = "playground-test-key"  # the server under test must require this key (lmforge serve --api-key)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser test skipped: the playwright package is not installed "
                                          "(pip install playwright, or the dev extra)")
    executable = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("browser test skipped: no chromium executable (apt-get install chromium, or set "
                    "LMFORGE_CHROMIUM to a Chromium binary)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """`lmforge serve`'s app on a tiny random run with a 64-token context, on a free port, behind API_KEY."""
    # Big enough that a long reply takes a while on a CPU (a 256-token context, 4 x 256), so that stop can cut it.
    run = make_run(tmp_path_factory.mktemp("playground") / "tiny-playground",
                   **{"model.block_size": "256", "model.n_layer": "4", "model.n_embd": "256"})
    with LiveServer(build_app(run, device="cpu", max_batch=4, api_key=API_KEY)) as server:
        yield server.url


FINISHED = "() => document.getElementById('stop').disabled && document.getElementById('status').textContent !== ''"


@pytest.fixture
def page(browser, server_url):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.set_default_timeout(PATIENCE * 1000)
    page.goto(server_url)
    page.fill("#api-key", API_KEY)
    page.fill("#temperature", "0")  # greedy: a real model answers the same way every run
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model-name').textContent !== '…'")
    yield page
    page.close()


def send(page, text: str, max_tokens: int) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


def test_without_the_api_key_the_page_shows_the_servers_401(browser, server_url):
    page = browser.new_page()
    page.goto(server_url)
    page.wait_for_function("() => document.getElementById('status').textContent !== ''")
    assert page.text_content("#model-name") == "…"
    assert "key" in page.text_content("#status").lower()
    assert "error" in page.get_attribute("#status", "class")
    page.close()


def test_page_shows_the_model_and_streams_a_completion(page):
    assert page.text_content("#model-name") not in ("", "…")
    context_length = int(page.text_content("#context-length"))
    assert int(page.get_attribute("#max-tokens", "max")) == context_length
    page.select_option("#mode", "completion")
    send(page, "the cat", max_tokens=context_length // 2)
    page.wait_for_function(FINISHED)
    status = page.text_content("#status")
    assert status.startswith("done")
    assert page.text_content("#output .prompt-text") == "the cat"
    assert page.text_content("#output .completion") != ""
    # The page shows the answer event by event as the server streams it: many text events, counted by the page
    # itself (a count of network reads or screen updates would depend on the machine's speed).
    assert int(re.search(r"(\d+) chunks", status).group(1)) > 1, status


def test_chat_keeps_the_conversation_and_saves_a_screenshot(page, tmp_path):
    send(page, "Hi.", max_tokens=8)
    page.wait_for_function(FINISHED)
    page.fill("#prompt", "And?")
    page.press("#prompt", "Enter")  # Enter sends in chat mode
    page.wait_for_function("() => document.querySelectorAll('.turn.assistant').length === 2")
    page.wait_for_function(FINISHED)
    assert page.text_content("#status").startswith("done")
    users = [text.strip() for text in page.locator(".turn.user .text").all_text_contents()]
    replies = page.locator(".turn.assistant .text").all_text_contents()
    assert users == ["Hi.", "And?"]
    assert all(replies) and len(replies) == 2
    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("LMFORGE_SCREENSHOT"):
        Path(os.environ["LMFORGE_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, os.environ["LMFORGE_SCREENSHOT"])


def test_stop_ends_a_long_answer_and_the_page_takes_the_next_one(page):
    context_length = int(page.text_content("#context-length"))
    page.fill("#max-tokens", str(context_length - 32))
    page.fill("#prompt", "Talk.")
    # In the page, not through Playwright's round trips: press stop the moment the answer's first text shows.
    page.evaluate("""() => {
      new MutationObserver((changes, observer) => {
        const reply = document.querySelector('.turn.assistant .text');
        if (reply && reply.textContent) { observer.disconnect(); document.getElementById('stop').click(); }
      }).observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true});
      document.getElementById('send').click();
    }""")
    page.wait_for_function(FINISHED)
    assert page.text_content("#status") == "stopped"
    stopped_at = page.text_content(".turn.assistant .text")
    page.wait_for_timeout(200)
    assert page.text_content(".turn.assistant .text") == stopped_at  # nothing more arrives after stop
    assert not page.is_disabled("#send")
    page.click("#clear")  # a new conversation: the stopped one may have filled a small context
    send(page, "Now briefly.", max_tokens=4)
    page.wait_for_function(FINISHED)
    assert page.text_content("#status").startswith("done")
    assert page.locator(".turn.assistant").count() == 1


@pytest.fixture(scope="module")
def classify_server(tmp_path_factory):
    """`lmforge serve`'s app on a tiny classify run (labels cat, dog, tree), behind API_KEY."""
    run = make_classify_run(tmp_path_factory.mktemp("playground-classify"))
    with LiveServer(build_app(run, device="cpu", api_key=API_KEY)) as server:
        yield server.url, run


def test_a_classifier_gets_the_classify_mode_with_a_bar_per_label(browser, classify_server):
    url, run = classify_server
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.set_default_timeout(PATIENCE * 1000)
    page.goto(url)
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('mode').value === 'classify'")
    assert page.locator("#mode option").all_text_contents() == ["classify"]
    assert page.is_hidden("#temperature") and page.is_hidden("#max-tokens")
    page.fill("#prompt", "the dog sat")
    page.press("#prompt", "Enter")
    page.wait_for_function(FINISHED)
    expected = predict(str(run), "the dog sat")
    ranked = sorted(CLASSIFY_LABELS, key=lambda label: -expected["probabilities"][label])
    assert page.text_content("#status") == f"done · {expected['label']}"
    assert page.locator(".labels .label").all_text_contents() == ranked
    assert page.text_content(".labels .predicted") == expected["label"]
    shown = page.locator(".labels .probability").all_text_contents()
    assert shown == [f"{100 * expected['probabilities'][label]:.1f}%" for label in ranked]
    widths = page.eval_on_selector_all(".labels .bar", "bars => bars.map(bar => bar.style.width)")
    assert widths == shown
    page.close()
