"""Documents people have (PDF, HTML, Markdown, DOCX, written by the tests themselves), passage metadata, and
metadata filters honoured inside every search (exact top-k among the passages that pass)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_jsonl

from ragline.errors import RaglineError

PDF_PAGES = ["The lighthouse of Quendor was built in 1820 by the keeper Zorblax on the northern cliffs.",
             "Page two describes the granite tower, thirty metres high, and its whale-oil lamp.",
             "The third page lists the keepers who followed Zorblax until the light was automated in 1950."]


def _pdf(path: Path, pages: list[str], title: str) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title(title)
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))
    return path


def _docx(path: Path) -> Path:
    import docx

    d = docx.Document()
    d.core_properties.title = "Harbour Guide"
    d.add_paragraph("Welcome to the harbour of Quendor, sheltered from the western gales.")
    d.add_heading("Moorings", 1)
    d.add_paragraph("Boats moor at the eastern quay, which holds forty berths.")
    t = d.add_table(rows=2, cols=2)
    for (r, c), text in {(0, 0): "Berth", (0, 1): "Fee", (1, 0): "East quay", (1, 1): "12 crowns"}.items():
        t.cell(r, c).text = text
    d.add_heading("Tides", 1)
    d.add_paragraph("High tide arrives twice a day at the northern breakwater.")
    d.save(str(path))
    return path


HTML = """<!doctype html><html><head><title>Fog of the Northern Sea</title></head><body>
<nav><a href="/">Home</a> | <a href="/shop">Gift shop</a> | <a href="/login">Sign in</a></nav>
<article><h1>Fog of the Northern Sea</h1>
<p>The northern sea is covered in fog for most of the winter, and sailors rely on the lighthouses of Quendor to find
their way home safely through the shoals.</p>
<h2>Causes</h2>
<p>Cold currents meet warm air above the water, which condenses into thick banks of fog that can last for days.</p>
</article><footer>Copyright 2026 Quendor Tourism Board | Privacy policy | Cookie settings</footer></body></html>"""

MARKDOWN = """# Keeper Notes

What a keeper of the Quendor light does.

## Duties

The keeper trims the **wick** every night and polishes the `lens` at dawn.

## Pay

Keepers earn twelve crowns a week, paid by the harbour master.
"""


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("documents")
    _pdf(d / "reports" / "lighthouse.pdf", PDF_PAGES, "Quendor Lighthouse Report")
    _docx(d / "guide.docx")
    (d / "fog.html").write_text(HTML)
    (d / "notes.md").write_text(MARKDOWN)
    (d / "plain.txt").write_text("A plain note about the ferry to the island, which sails at noon.")
    return d


def _bad_files(d: Path) -> dict[str, str]:
    """A malformed PDF, a password-protected PDF and a malformed DOCX; name -> what the error says."""
    from pypdf import PdfWriter

    (d / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a PDF at all")
    src = _pdf(d / "tmp" / "plain.pdf", ["secret text"], "Secret")
    w = PdfWriter(clone_from=src)
    w.encrypt(user_password="hunter2", owner_password="owner", algorithm="AES-128")
    w.write(d / "secret.pdf")
    (d / "tmp" / "plain.pdf").unlink()
    (d / "tmp").rmdir()
    (d / "broken.docx").write_bytes(b"PK\x03\x04 not a zip file")
    return {"broken.pdf": "not a readable PDF", "secret.pdf": "encrypted", "broken.docx": "not a readable DOCX"}


def test_each_kind_reads_with_its_text_title_pages_and_sections(docs_dir):
    from ragline.corpus.passages import split_documents
    from ragline.corpus.readers import read_corpus

    docs = {d.id: d for d in read_corpus(docs_dir)}
    assert sorted(docs) == ["fog.html", "guide.docx", "notes.md", "plain.txt", "reports/lighthouse.pdf"]
    passages = {p.pid: p for p in split_documents(docs.values())}
    pdf = [passages[f"reports/lighthouse.pdf#{i}"] for i in range(3)]
    assert [p.meta for p in pdf] == [{"source": "reports/lighthouse.pdf", "page": i} for i in (1, 2, 3)]
    assert [p.text for p in pdf] == PDF_PAGES and pdf[0].title == "Quendor Lighthouse Report"
    html = docs["fog.html"]
    assert html.title == "Fog of the Northern Sea" and "condenses into thick banks of fog" in html.text
    assert not any(w in html.text for w in ("Gift shop", "Sign in", "Cookie settings", "Privacy policy"))
    assert [s.meta for s in html.sections] == [{}, {"section": "Causes"}]
    md = [p for p in passages.values() if p.doc_id == "notes.md"]
    assert md[0].title == "Keeper Notes"
    assert [(p.meta.get("section"), p.text) for p in md] == [
        (None, "What a keeper of the Quendor light does."),
        ("Duties", "The keeper trims the wick every night and polishes the lens at dawn."),
        ("Pay", "Keepers earn twelve crowns a week, paid by the harbour master.")]
    word = [p for p in passages.values() if p.doc_id == "guide.docx"]
    assert word[0].title == "Harbour Guide" and [p.meta.get("section") for p in word] == [None, "Moorings", "Tides"]
    assert "East quay | 12 crowns" in word[1].text
    assert docs["plain.txt"].title == "plain" and docs["plain.txt"].meta == {"source": "plain.txt"}


def test_bad_files_are_refused_or_skipped_with_their_path(docs_dir, tmp_path):
    import shutil

    from ragline.corpus.readers import ReadStats, read_corpus

    d = tmp_path / "mixed"
    shutil.copytree(docs_dir, d)
    expected = _bad_files(d)
    with pytest.raises(RaglineError, match=r"broken\.docx: not a readable DOCX.*--skip-bad"):
        list(read_corpus(d))
    stats = ReadStats()
    docs = list(read_corpus(d, skip_bad=True, stats=stats))
    assert len(docs) == 5 and stats.skipped == 3
    for name, what in expected.items():
        assert any(name in p and what in p for p in stats.problems), (name, stats.problems)


def test_a_failed_build_leaves_nothing_half_written(docs_dir, tmp_path, encoders):
    import shutil

    from ragline.index.build import BuildOptions, build_index

    d = tmp_path / "mixed"
    shutil.copytree(docs_dir, d)
    _bad_files(d)
    with pytest.raises(RaglineError, match="broken"):
        build_index(BuildOptions(source=str(d), out=tmp_path / "ix", progress=False), encoders=encoders,
                    log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ix.lock", "mixed"]


@pytest.fixture(scope="module")
def meta_index(tmp_path_factory, docs_dir, wiki_docs, encoders) -> Path:
    """The documents folder plus 60 bundled pages with JSONL metadata (year, team), in one index built with
    `ragline add` on top of the folder's."""
    from ragline.index.build import BuildOptions, build_index
    from ragline.index.update import add_documents

    d = tmp_path_factory.mktemp("meta-index")
    ix = build_index(BuildOptions(source=str(docs_dir), out=d / "ix", progress=False), encoders=encoders,
                     log=lambda m: None)
    records = [{**x, "metadata": {"year": 2020 + i % 5, "team": ["search", "ads", "maps"][i % 3],
                                  "reviewed": i % 2 == 0}} for i, x in enumerate(wiki_docs[:60])]
    add_documents(ix, [str(write_jsonl(d / "wiki.jsonl", records))], encoder=encoders.passage, log=lambda m: None)
    return ix


def _passes(hit, conditions) -> bool:
    from ragline.index.filters import as_text

    meta = {**{k: as_text(v) for k, v in hit.meta.items()}, "pid": hit.pid, "doc_id": hit.doc_id, "title": hit.title}
    fields = {c.field for c in conditions}
    for f in fields:
        eq = [c for c in conditions if c.field == f and c.op != "!="]
        ne = [c for c in conditions if c.field == f and c.op == "!="]
        v = meta.get(f)
        if eq and not any(c.test(v) for c in eq) or not all(c.test(v) for c in ne):
            return False
    return True


@pytest.mark.parametrize("filters", [["source=reports/*"], ["page=2"], ["team=search", "year!=2021"],
                                     ["team=ads", "team=maps"], ["reviewed=true"], ["source!=notes.md"],
                                     ["title=Harbour Guide"]])
def test_filters_give_the_exact_top_k_among_the_passages_that_pass(meta_index, encoders, filters):
    from ragline.index.filters import Condition
    from ragline.index.hybrid import rrf_fuse
    from ragline.retriever import Retriever

    r = Retriever(meta_index, encoders.question)
    conditions = [Condition.parse(f) for f in filters]
    n = r.index.live_passages
    for q in ("lighthouse keeper of Quendor", "a famous painting", "fog at sea"):
        full = {m: r.search([q], n, m)[0] for m in ("dense", "bm25")}
        for mode in ("dense", "bm25"):
            want = [h for h in full[mode] if _passes(h, conditions)][:5]
            got = r.search([q], 5, mode, filters=filters)[0]
            assert [h.pid for h in got] == [h.pid for h in want], (mode, q, filters)
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-6)
        rows = [np.array([[h.row for h in full[m] if _passes(h, conditions)][:100]]) for m in ("dense", "bm25")]
        _, fused = rrf_fuse(rows, 5, weights=(1.0, r.bm25_weight))
        got = r.search([q], 5, "hybrid", filters=filters)[0]
        assert [h.row for h in got] == [x for x in fused[0].tolist() if x >= 0], (q, filters)
        assert all(_passes(h, conditions) for h in got)


def test_a_filter_matching_fewer_than_k_returns_all_of_them(meta_index, encoders):
    from ragline.retriever import Retriever

    r = Retriever(meta_index, encoders.question)
    hits = r.search(["lighthouse"], 10, "dense", filters=["source=reports/lighthouse.pdf"])[0]
    assert sorted(h.meta["page"] for h in hits) == [1, 2, 3]
    assert r.search(["lighthouse"], 10, "bm25", filters=["source=nowhere/*"])[0] == []
    with pytest.raises(RaglineError, match="has no '='"):
        r.search(["lighthouse"], 3, "dense", filters=["source"])


def test_jsonl_metadata_is_checked(tmp_path):
    from ragline.corpus.readers import read_corpus

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "x", "metadata": {"nested": {"no": 1}}}])
    with pytest.raises(RaglineError, match=r'bad\.jsonl:1: "metadata" is not an object'):
        list(read_corpus(bad))


def test_stores_written_before_metadata_read_as_empty_metadata(tmp_path):
    import pyarrow as pa

    from ragline.corpus.store import LEGACY_SCHEMA, PassageStore

    path = tmp_path / "passages.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, LEGACY_SCHEMA) as w:
        w.write_batch(pa.record_batch([["a#0"], ["a"], ["A"], ["text"]], schema=LEGACY_SCHEMA))
    store = PassageStore(path)
    assert store.get([0])[0].meta == {} and store.values("meta") == [""]


def test_cli_shows_where_a_passage_comes_from_and_refuses_a_bad_filter(meta_index):
    out = run_cli("search", "--index", meta_index, "-k", "1", "--filter", "source=reports/*", "--mode", "bm25",
                  "granite tower whale-oil lamp")
    assert "reports/lighthouse.pdf, p. 2" in out
    line = json.loads(run_cli("search", "--index", meta_index, "-k", "2", "--json", "--filter", "team=maps",
                              "--filter", "year=2022", "painting"))
    assert line["hits"] and all(h["meta"]["team"] == "maps" and h["meta"]["year"] == 2022 for h in line["hits"])
    from click.testing import CliRunner

    from ragline.cli import cli

    with pytest.raises(RaglineError, match="names no field"):
        CliRunner().invoke(cli, ["search", "--index", str(meta_index), "--filter", "=x", "q"], catch_exceptions=False)


def test_http_routes_take_filters(meta_index, tmp_path):
    import shutil

    import httpx
    from conftest import running_server, tiny_generator

    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app

    shutil.copytree(meta_index, tmp_path / "ix")
    app = create_app(RagModel(Retriever(tmp_path / "ix"), tiny_generator(), k=3), tmp_path)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/search", json={"question": "keeper duties", "k": 3, "filter": ["source=notes.md"]})
        assert r.status_code == 200
        assert {h["meta"]["source"] for h in r.json()["hits"]} == {"notes.md"}
        a = client.post("/ask", json={"question": "Who built the lighthouse?", "k": 3, "model": "rag-token",
                                      "decoding": "greedy", "max_new_tokens": 2, "filter": ["source=reports/*"]})
        assert a.status_code == 200
        assert sorted(s["meta"]["page"] for s in a.json()["sources"]) == [1, 2, 3]
        chat = client.post("/v1/chat/completions", json={
            "model": "ragline-rag-token", "messages": [{"role": "user", "content": "Who built the lighthouse?"}],
            "max_tokens": 2, "k": 2, "decoding": "greedy", "filter": ["page!=2", "source=reports/*"]})
        assert chat.status_code == 200, chat.text
        assert sorted(s["meta"]["page"] for s in chat.json()["ragline"]["sources"]) == [1, 3]
        bad = client.post("/search", json={"question": "q", "filter": ["no-equals-sign"]})
        assert bad.status_code == 422 and "has no '='" in bad.text
        few = client.post("/ask", json={"question": "q", "k": 3, "filter": ["source=notes.md", "section=Pay"]})
        assert few.status_code == 400 and "filter" in few.json()["error"]


def test_ask_and_eval_take_filters(meta_index, wiki_docs, tmp_path):
    from ragline.models.tiny import save_tiny_causal

    tiny = save_tiny_causal(tmp_path / "tiny")
    common = ["--index", meta_index, "--generator", tiny, "-k", 2, "--max-new-tokens", 2, "--filter", "team=maps"]
    answer = json.loads(run_cli("ask", "Who painted the Mona Lisa?", "--model", "rag-token", "--json", *common))
    assert [s["meta"]["team"] for s in answer["sources"]] == ["maps", "maps"]
    task = write_jsonl(tmp_path / "task.jsonl", [{"id": f"q{i}", "input": q, "output": [{"answer": "x"}]} for i, q in
                                                 enumerate(["Who painted the Mona Lisa?", "What is jazz?"])])
    run_cli("eval", "--task", task, "--out", tmp_path / "run", *common)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["filters"] == ["team=maps"]
    maps = {x["title"] for i, x in enumerate(wiki_docs[:60]) if i % 3 == 2}
    for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines():
        titles = {p["title"] for o in json.loads(line)["output"] for p in o.get("provenance", [])}
        assert titles and titles <= maps
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 2
