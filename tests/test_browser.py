"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): ask a question, wait
for the streamed answer, check the ranked passages with their weights and the per-token colouring, and save a
screenshot. Skips, saying why, only where Chromium or Playwright is missing (`scripts/test.sh` installs both
where it can)."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import running_server, tiny_generator

CHROMIUM = os.environ.get("RAGLINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As root in a sandbox-less container, with no network: no sandbox, no GPU, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("RAGLINE_SCREENSHOTS", "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's 'chromium' (scripts/test.sh does as root) "
                    "or set RAGLINE_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, small_index):
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app

    root = tmp_path_factory.mktemp("site")
    for name in ("first", "second"):
        shutil.copytree(small_index, root / name)
    app = create_app(RagModel(Retriever(root / "first"), tiny_generator(), k=3), root)
    with running_server(app) as url:
        yield url


def _ask(page, question: str, model: str, decoding: str, k: int) -> None:
    page.fill("#question", question)
    page.select_option("#model", model)
    page.select_option("#decoding", decoding)
    page.fill("#k", str(k))
    page.click("#ask")
    page.wait_for_selector("#meta:not(:empty)", timeout=120_000)  # filled by the final 'answer' event


def test_page_asks_streams_and_colours_tokens_by_passage(browser, site):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(site)
    page.wait_for_selector("#index option", state="attached")
    assert page.eval_on_selector_all("#index option", "os => os.map(o => o.textContent)") == ["first", "second"]

    _ask(page, "Who designed the Chrysler Building?", "rag-token", "greedy", 4)
    assert page.text_content("#error") == ""
    assert "rag-token, greedy; log p = " in page.text_content("#meta")
    passages = page.query_selector_all("#passages li")
    assert len(passages) == 4  # ranked, each with p(z|x) -> p(z|x,y) and a bar
    titles = [li.query_selector(".title").text_content() for li in passages]
    assert [t.split("]")[0] for t in titles] == ["[1", "[2", "[3", "[4"]
    assert all("p(z|x)" in li.query_selector(".weights").text_content() for li in passages)
    tokens = page.query_selector_all("#answer .tok")
    assert tokens, "RAG-Token answers are shown token by token"
    for tok in tokens:  # each token is coloured by its passage, and hovering names that passage
        n = int(tok.get_attribute("data-passage"))
        assert 1 <= n <= 4 and tok.get_attribute("title").startswith(f"[{n}] ")
        colour = tok.evaluate("e => getComputedStyle(e).backgroundColor")
        border = passages[n - 1].evaluate("e => getComputedStyle(e).borderLeftColor")
        assert colour == border
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "page-rag-token.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    _ask(page, "Who designed the Chrysler Building?", "rag-sequence", "thorough", 2)
    assert len(page.query_selector_all("#passages li")) == 2 and not page.query_selector_all("#answer .tok")

    page.select_option("#index", "second")  # the index switch hot-swaps on the server
    page.wait_for_function("fetch('/health').then(r => r.json()).then(h => h.index.name === 'second')")

    page.fill("#question", "x" * 1001)  # too long: the server's message and fix reach the page
    page.click("#ask")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60_000)
    assert "question" in page.text_content("#error") and "1000" in page.text_content("#error")
    assert errors == []
    page.close()
