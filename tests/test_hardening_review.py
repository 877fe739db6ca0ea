"""Hardening, second pass: each finding of the review of the server routes, ingestion and updates, pinned by a
test that fails on the code before its fix (issue 35's items, numbered as there)."""

import asyncio
import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import app_over_copies, running_server, write_jsonl

from ragline.errors import RaglineError

SEARCH = {"question": "Who wrote Candide?", "k": 3}


@pytest.fixture(scope="module")
def where(tmp_path_factory, small_index):
    return tmp_path_factory.mktemp("review"), small_index


# 1. filter field names -------------------------------------------------------------------------------------

def test_invented_filter_fields_are_refused_and_grow_nothing(where):
    from ragline.index.filters import MASKS_KEPT

    app = app_over_copies(*where)
    index = app.state.worker.rag.retriever.index
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for r in range(20):
            fields = [f"f{r}x{i}=1" for i in range(16)]
            got = client.post("/search", json={**SEARCH, "filter": fields})
            assert got.status_code == 422, got.text
            assert "has no passage with a field" in got.json()["error"]
            assert "pid, title" in got.json()["fix"] or "doc_id, pid, title" in got.json()["fix"]
        ok = client.post("/search", json={**SEARCH, "filter": ["title!=Nothing"]})
        assert ok.status_code == 200 and len(ok.json()["hits"]) == 3
    kept = {k: v for k, v in vars(index).items() if k.startswith("_filter")}
    assert set(kept) <= {"_filter_masks", "_filter_fields"} and len(kept["_filter_masks"]) <= MASKS_KEPT
    assert kept["_filter_fields"] == {"pid", "doc_id", "title"}


def test_metadata_filters_read_the_stores_column_without_copies(tmp_path, encoders):
    from ragline.index.build import BuildOptions, build_index
    from ragline.index.filters import UnknownField, allowed_rows, parse_filters
    from ragline.index.registry import open_index

    docs = [{"id": f"d{i}", "title": f"T{i}", "text": f"passage number {i} about things",
             "metadata": {"team": ["a", "b"][i % 2], **({"year": 2020 + i} if i < 4 else {}), "é": "x"}}
            for i in range(10)]
    ix = build_index(BuildOptions(source=str(write_jsonl(tmp_path / "c.jsonl", docs)), out=tmp_path / "ix",
                                  progress=False), encoders=encoders, log=lambda m: None)
    index = open_index(ix)
    rows = allowed_rows(index, parse_filters(["team=b", "year!=2021"]))
    teams = [json.loads(m) for m in index.store.values("meta")]
    assert rows.tolist() == [t["team"] == "b" and t.get("year") != 2021 for t in teams]
    assert allowed_rows(index, parse_filters(["year=2022"])).sum() == 1
    assert allowed_rows(index, parse_filters(["é=x"])).all()
    with pytest.raises(UnknownField, match="no passage with a field 'colour'") as e:
        allowed_rows(index, parse_filters(["colour=red"]))
    assert "team" in e.value.fix and "year" in e.value.fix and e.value.status == 422
    assert not [k for k in vars(index) if k.startswith("_filter") and k not in ("_filter_masks", "_filter_fields")]


def test_a_sharded_index_filters_inside_each_shard(sharded, small_index, monkeypatch):
    from ragline.index.filters import UnknownField, allowed_rows, parse_filters
    from ragline.index.registry import open_index
    from ragline.scale.sharded import ShardedStore

    single, many = open_index(small_index), open_index(sharded[0])
    title = single.store.values("title")[7]

    def no_columns(self, column):
        raise AssertionError(f"the server process read the whole {column} column")

    monkeypatch.setattr(ShardedStore, "values", no_columns)
    for spec in ([f"title={title}"], [f"title!={title}", "doc_id!=x"]):
        want = allowed_rows(single, parse_filters(spec))
        assert np.array_equal(allowed_rows(many, parse_filters(spec)), want)
    with pytest.raises(UnknownField):
        allowed_rows(many, parse_filters(["source=x"]))


# 2. Host header and JSON content type ----------------------------------------------------------------------

def test_requests_naming_another_host_are_refused_on_every_route(where):
    app = app_over_copies(*where, allowed_hosts=("rag.example.org",))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        port = url.rsplit(":", 1)[1]
        pid = client.post("/search", json=SEARCH).json()["hits"][0]["pid"]
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.evil"):
            for method, path, body in (("POST", "/search", SEARCH), ("GET", f"/passages/{pid.replace('#', '%23')}",
                                                                     None), ("GET", "/health", None),
                                       ("GET", "/", None), ("GET", "/v1/models", None), ("POST", "/mcp", {})):
                r = client.request(method, path, json=body, headers={"Host": host})
                assert r.status_code == 421, (host, path, r.status_code)
                if path != "/mcp" and not path.startswith("/v1"):
                    assert r.json()["fix"].startswith("use the address")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "rag.example.org:443"):
            assert client.post("/search", json=SEARCH, headers={"Host": host}).status_code == 200, host


def test_host_policy():
    from ragline.serve.hosts import HostPolicy, host_name

    assert [host_name(h) for h in ("[::1]:8000", "Example.ORG.", "a:1", "::1")] == ["::1", "example.org", "a", "::1"]
    loop = HostPolicy("127.0.0.1")
    assert loop.accepts("localhost:8000") and loop.accepts(None) and not loop.accepts("10.0.0.1")
    every = HostPolicy("0.0.0.0", ["ragline.internal"])
    assert every.accepts("10.0.0.1:8000") and every.accepts("[fe80::1]") and every.accepts("ragline.internal")
    assert not every.accepts("attacker.example")
    assert HostPolicy("127.0.0.1", ["*"]).accepts("anything.example")


def test_a_json_body_without_a_json_content_type_is_refused(where):
    with running_server(app_over_copies(*where)) as url, httpx.Client(base_url=url, timeout=60) as client:
        swap = client.post("/indexes/active", content=json.dumps({"name": "b"}), headers={"Content-Type": "text/plain"})
        assert swap.status_code == 422  # a page's no-preflight POST cannot switch the index
        assert client.get("/health").json()["index"]["name"] == "a"
        r = client.post("/search", content=json.dumps(SEARCH))  # no content type at all
        assert r.status_code == 422


# 3. model folders that carry code --------------------------------------------------------------------------

def test_an_encoder_folder_naming_its_own_module_is_refused_and_never_run(tmp_path):
    from sentence_transformers import SentenceTransformer

    from ragline.models.catalog import encoder_path
    from ragline.models.encoders import load_encoder

    folder = tmp_path / "encoder"
    shutil.copytree(encoder_path("minilm")[1], folder)
    marker = tmp_path / "ran"
    (folder / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil:\n    pass\n")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "", "type": "evil_module.Evil"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(RaglineError, match="not part of sentence-transformers"):
        load_encoder(str(folder))
    with pytest.raises(Exception, match="trust_remote_code"):  # the installed release refuses on its own too
        SentenceTransformer(str(folder), device="cpu")
    assert not marker.exists()


# 4. long chat histories ------------------------------------------------------------------------------------

def test_a_huge_earlier_turn_is_never_tokenised_and_nothing_is_tokenised_on_the_event_loop(where):
    from ragline.serve import openai_api

    app = app_over_copies(*where)
    worker = app.state.worker
    counted, on_loop = [], []
    real = worker.question_tokens

    def count(text):
        counted.append(len(text))
        try:
            asyncio.get_running_loop()
            on_loop.append(text)
        except RuntimeError:
            pass
        return real(text)

    worker.question_tokens = count
    long_turn = "word " * 780_000  # 3.9 MB
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "ragline-rag-token", "max_tokens": 2, "decoding": "greedy", "k": 2,
            "messages": [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "Voltaire?"},
                         {"role": "user", "content": "Who wrote Candide?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["ragline"]["history_turns"] == 1  # the assistant's turn fits, the huge one does not
        asked = r.json()["ragline"]["question"]
    bound = worker.budget.max_question_tokens * openai_api.CHARS_PER_TOKEN
    assert counted and max(counted) <= bound
    # the history is weighed off the event loop; there only the question read, within the budget, is counted
    assert set(on_loop) == {asked} and asked == "Assistant: Voltaire?\nWho wrote Candide?"


# 5. links out of an ingested folder ------------------------------------------------------------------------

def test_folder_ingestion_skips_and_reports_links_that_lead_outside(tmp_path, encoders):
    from ragline.corpus.readers import ReadStats, read_corpus
    from ragline.index.build import BuildOptions, build_index

    (tmp_path / "outside-secret.txt").write_text("The launch code is 0000, a secret.")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "more.txt").write_text("More secrets outside the folder.")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "guide.txt").write_text("The harbour guide explains the tides.")
    (docs / "sub" / "inner.txt").write_text("An inner note about boats.")
    os.symlink("../outside-secret.txt", docs / "notes.txt")
    os.symlink("../outside", docs / "linked")
    os.symlink("sub/inner.txt", docs / "alias.txt")  # inside the folder: read
    stats = ReadStats()
    read = {d.id: d.text for d in read_corpus(docs, stats=stats)}
    assert sorted(read) == ["alias.txt", "guide.txt", "sub/inner.txt"]
    assert sorted(stats.links_skipped) == ["linked", "notes.txt"]
    said = []
    ix = build_index(BuildOptions(source=str(docs), out=tmp_path / "ix", progress=False), encoders=encoders,
                     log=said.append)
    from ragline.index.registry import open_index

    texts = " ".join(open_index(ix).store.values("text"))
    assert "secret" not in texts and any("skipped 2 links that lead out of the folder" in m for m in said)


# 6. searches and embeddings are bounded like questions -----------------------------------------------------

def test_searches_waiting_for_the_model_thread_are_bounded_and_health_still_answers(where):
    from ragline.serve.budget import Budget

    app = app_over_copies(*where, budget=Budget(max_queue=2))
    worker = app.state.worker
    release = threading.Event()
    worker.turns.start(lambda: release.wait(60))  # the model thread is busy until released
    try:
        with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            codes = []

            def search(body):
                codes.append(client.post("/search", json=body).status_code)

            def embed():
                codes.append(client.post("/v1/embeddings", json={"model": "ragline-question-encoder",
                                                                 "input": "x"}).status_code)

            threads = [threading.Thread(target=search, args=(SEARCH,)) for _ in range(3)] + \
                      [threading.Thread(target=embed) for _ in range(2)] + \
                      [threading.Thread(target=search, args=(SEARCH,)) for _ in range(50)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while sorted(codes).count(503) < len(threads) - 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert codes.count(503) == len(threads) - 2, codes  # two wait; every other is refused at once
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["worker"]["calls"] == 2
            release.set()
            for t in threads:
                t.join(60)
            assert sorted(codes) == [200, 200] + [503] * (len(threads) - 2)
    finally:
        release.set()


# 7. U+2028 and U+2029 in streamed events -------------------------------------------------------------------

def test_streamed_events_escape_line_separators():
    from ragline.serve import app as app_module
    from ragline.serve import openai_api

    for line in (app_module._sse("answer", {"text": "a\u2028b\u2029c"}), openai_api._data({"t": "a\u2028b"})):
        assert "\u2028" not in line and "\u2029" not in line
        data = [x for x in line.splitlines() if x.startswith("data: ")]  # splitlines breaks at U+2028 too
        assert len(data) == 1 and "\u2028" in json.dumps(json.loads(data[0][6:]), ensure_ascii=False)


# 8. DOCX bounds --------------------------------------------------------------------------------------------

def _docx(path: Path, paragraphs: list[str], heading: str | None = None) -> Path:
    import docx

    d = docx.Document()
    if heading:
        d.add_heading(heading, level=1)
    for p in paragraphs:
        d.add_paragraph(p)
    d.save(str(path))
    return path


def test_docx_malformed_or_too_large_is_skipped_with_a_report(tmp_path, monkeypatch):
    import docx.text.paragraph

    from ragline.corpus import documents
    from ragline.corpus.readers import ReadStats, read_corpus

    folder = tmp_path / "docs"
    folder.mkdir()
    good = _docx(folder / "good.docx", ["First body line.", "Second body line."], heading="Tides")
    broken = folder / "broken.docx"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename == "word/document.xml" else data)
    _docx(folder / "long.docx", [""] * 60 + ["text"])
    (folder / "notes.txt").write_text("A plain note.")

    def slow_style(self):
        raise AssertionError("a paragraph's style looked up through python-docx (about 1 ms each)")

    monkeypatch.setattr(docx.text.paragraph.Paragraph, "style", property(slow_style))
    monkeypatch.setattr(documents, "MAX_DOCX_BLOCKS", 50)
    stats = ReadStats()
    read = {d.id: d for d in read_corpus(folder, skip_bad=True, stats=stats)}
    assert sorted(read) == ["good.docx", "notes.txt"] and stats.skipped == 2
    assert read["good.docx"].sections[0].meta == {"section": "Tides"}
    assert any("broken.docx: not a readable DOCX file (XMLSyntaxError" in p for p in stats.problems), stats.problems
    assert any("long.docx: more than 50 paragraphs" in p for p in stats.problems)
    with pytest.raises(RaglineError, match="broken.docx: not a readable DOCX"):
        list(read_corpus(folder))
    monkeypatch.setattr(documents, "MAX_DOCX_XML_BYTES", 1000)
    with pytest.raises(RaglineError, match="unzips to"):
        documents.read_document(good)


# 9. invalid UTF-8 with --skip-bad --------------------------------------------------------------------------

def test_an_invalid_utf8_line_is_one_bad_record(tmp_path):
    from ragline.corpus.readers import ReadStats, read_corpus
    from ragline.questions import load_task

    good = json.dumps({"id": "a", "text": "fine text"}).encode()
    bad = b'{"id": "b", "text": "caf\xe9"}'
    (tmp_path / "c.jsonl").write_bytes(bad + b"\n" + good + b"\n")
    stats = ReadStats()
    assert [d.id for d in read_corpus(tmp_path / "c.jsonl", skip_bad=True, stats=stats)] == ["a"]
    assert stats.skipped == 1 and "c.jsonl:1: not valid UTF-8" in stats.problems[0]
    with pytest.raises(RaglineError, match="not valid UTF-8"):
        list(read_corpus(tmp_path / "c.jsonl"))
    kilt = [json.dumps({"wikipedia_id": "1", "wikipedia_title": "A", "text": ["A", "Body."]}).encode(),
            b'{"wikipedia_id": "2", "wikipedia_title": "B", "text": ["\xff"]}']
    (tmp_path / "k.jsonl").write_bytes(b"\n".join(kilt) + b"\n")
    stats = ReadStats()
    assert [d.id for d in read_corpus(tmp_path / "k.jsonl", "kilt", skip_bad=True, stats=stats)] == ["1"]
    task = tmp_path / "t.jsonl"
    task.write_bytes(b'{"id": "q1", "input": "caf\xe9?", "output": [{"answer": "x"}]}\n'
                     + json.dumps({"id": "q2", "input": "Why?", "output": [{"answer": "y"}]}).encode() + b"\n")
    loaded = load_task(task, skip_bad=True)
    assert [q.id for q in loaded.questions] == ["q2"] and "not valid UTF-8" in loaded.skipped[0]


# 10. one API key rule ----------------------------------------------------------------------------------------

def test_a_non_ascii_key_sent_as_utf8_is_accepted_by_serve_and_mcp_alike(where):
    from ragline.serve.mcp_server import require_key

    key = "clé-ß-鍵"
    header = {"Authorization": f"Bearer {key}".encode()}
    wrong = {"Authorization": "Bearer cl\u00e9".encode()}
    app = app_over_copies(*where, api_key=key)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health", headers=header).status_code == 200
        assert client.get("/health", headers=wrong).status_code == 401
        assert client.get("/health", headers={"Authorization": f"Bearer {key}".encode("latin-1", "replace")}
                          ).status_code == 401

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with running_server(require_key(ok, key)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/mcp", headers=header).status_code == 200
        assert client.get("/mcp", headers=wrong).status_code == 401


# 11. eval stays on the generation it started on --------------------------------------------------------------

def test_eval_answers_from_the_generation_its_config_names(tmp_path, small_index, encoders, monkeypatch):
    from conftest import run_cli

    from ragline.index.update import add_documents
    from ragline.models.tiny import save_tiny_causal
    from ragline.rag.model import RagModel

    ix = tmp_path / "ix"
    shutil.copytree(small_index, ix)
    new_doc = {"id": "zz", "title": "Candide author page", "text": "Who wrote Candide? Candide was written by "
                                                                   "Voltaire. Who wrote Candide? Voltaire."}
    real = RagModel.answer
    calls = []

    def answer_then_update(self, questions, **kw):
        out = real(self, questions, **kw)
        if not calls:  # after the first batch, a new generation lands in the index directory
            add_documents(ix, [str(write_jsonl(tmp_path / "new.jsonl", [new_doc]))], encoder=encoders.passage,
                          log=lambda m: None)
        calls.append(questions)
        return out

    monkeypatch.setattr(RagModel, "answer", answer_then_update)
    task = write_jsonl(tmp_path / "task.jsonl", [{"id": f"q{i}", "input": "Who wrote Candide?",
                                                  "output": [{"answer": "Voltaire"}]} for i in range(2)])
    run_cli("eval", "--task", task, "--index", ix, "--generator", save_tiny_causal(tmp_path / "tiny"), "-k", 3,
            "--max-new-tokens", 2, "--model", "rag-token", "--batch", 1, "--out", tmp_path / "run")
    assert len(calls) == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["index_fingerprint"] != json.loads((ix / "manifest.json").read_text())["fingerprint"]
    for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines():
        titles = {p["title"] for o in json.loads(line)["output"] for p in o.get("provenance", [])}
        assert titles and "Candide author page" not in titles


# 12. directories fsynced before the manifest names what they hold -------------------------------------------

def test_segment_and_tombstone_folders_are_fsynced_before_the_manifest(tmp_path, small_index, encoders, monkeypatch):
    from ragline import atomic
    from ragline.index import update

    ix = tmp_path / "ix"
    shutil.copytree(small_index, ix)
    events = []
    real_fsync, real_write = atomic.fsync_dir, atomic.write_json
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(atomic, "write_json", lambda p, o: (events.append(("write", Path(p).name)),
                                                             real_write(p, o)))
    doc = {"id": "new-doc", "title": "New", "text": "a new document about lighthouses"}
    update.add_documents(ix, [str(write_jsonl(tmp_path / "a.jsonl", [doc]))], encoder=encoders.passage,
                         log=lambda m: None)
    manifest_at = events.index(("write", "manifest.json"))
    assert ("fsync", "segments") in events[:manifest_at], events
    events.clear()
    update.delete_documents(ix, ["new-doc"], log=lambda m: None)
    manifest_at = events.index(("write", "manifest.json"))
    assert ("fsync", "tombstones") in events[:manifest_at], events
