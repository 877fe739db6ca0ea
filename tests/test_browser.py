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


HOSTILE_TITLE = 'Evil" onmouseover="window.__xss=1" x="'
HOSTILE_TEXT = ('Rome is "the eternal city" <img src=x onerror="window.__xss=2"> and '
                '</span><script>window.__xss=3</script> x" onmouseover="window.__xss=4" & more words about Rome.')
HOSTILE_INDEX = '<img src=x onerror="window.__xss=5">'


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory, encoders):
    """An index whose passages and titles, and a sibling index whose name, carry markup and quotes."""
    from conftest import write_jsonl

    from ragline.index.build import BuildOptions, build_index
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app

    root = tmp_path_factory.mktemp("hostile")
    docs = [{"id": f"d{i}", "title": HOSTILE_TITLE if i == 0 else f"Rome {i}", "text": HOSTILE_TEXT} for i in range(4)]
    src = write_jsonl(root / "corpus.jsonl", docs)
    build_index(BuildOptions(source=str(src), out=root / "evil", progress=False), encoders=encoders,
                log=lambda m: None)
    shutil.copytree(root / "evil", root / HOSTILE_INDEX)
    app = create_app(RagModel(Retriever(root / "evil"), tiny_generator(), k=3), root)
    with running_server(app) as url:
        yield url


def test_passages_titles_and_index_names_are_shown_as_text_never_run(browser, hostile_site):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(hostile_site)
    page.wait_for_selector("#index option", state="attached")
    names = page.eval_on_selector_all("#index option", "os => os.map(o => o.textContent)")
    assert HOSTILE_INDEX in names  # the name is an option's text, not markup
    _ask(page, "What is Rome?", "rag-token", "greedy", 4)  # every passage of the corpus
    # hover every token and passage (before the fix, a quote in a passage broke out of the tooltip attribute
    # and hovering the token ran the handler it carried)
    page.eval_on_selector_all("#answer .tok, #passages li, #passages span, #passages div",
                              "es => es.forEach(e => e.dispatchEvent(new MouseEvent('mouseover', {bubbles: true})))")
    handlers = page.evaluate("""() => [...document.querySelectorAll('#answer *, #passages *, #index *')]
        .flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on'))""")
    assert handlers == [] and page.evaluate("window.__xss") is None
    assert page.query_selector_all("#passages img, #passages script, #answer img") == []
    texts = page.eval_on_selector_all("#passages .text", "es => es.map(e => e.textContent)")
    assert texts and all(t == HOSTILE_TEXT for t in texts)  # shown verbatim, quotes and brackets as characters
    titles = page.eval_on_selector_all("#passages .title", "es => es.map(e => e.textContent)")
    assert any(HOSTILE_TITLE in t for t in titles)
    tips = [t.get_attribute("title") for t in page.query_selector_all("#answer .tok")]
    assert all("<img" in t for t in tips if "Rome" in t or "Evil" in t)  # whole, not cut at the first quote
    page.close()
