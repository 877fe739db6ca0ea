"""Indexes changed in place (ragline add / update / delete / compact) against indexes built from scratch over
the live documents, crashes in the middle of a change, and a server taking up 20 generations under load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, running_server, tiny_generator, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragline.errors import RaglineError

BASE_DOCS, POOL_DOCS = 40, 24
QUESTIONS = ["Who painted the Mona Lisa?", "ancient Greek philosophy", "a famous novel about war",
             "zebra quantum lighthouse", "capital of France"]


@pytest.fixture(scope="module")
def corpus(wiki_docs):
    return wiki_docs[:BASE_DOCS], wiki_docs[BASE_DOCS:BASE_DOCS + POOL_DOCS]


@pytest.fixture(scope="module")
def base_index(tmp_path_factory, corpus, encoders) -> Path:
    from ragline.index.build import BuildOptions, build_index

    d = tmp_path_factory.mktemp("living-base")
    src = write_jsonl(d / "base.jsonl", corpus[0])
    return build_index(BuildOptions(source=str(src), out=d / "base", progress=False), encoders=encoders,
                       log=lambda m: None)


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _scratch(docs: list[dict], where: Path, encoders) -> Path:
    from ragline.index.build import BuildOptions, build_index

    src = write_jsonl(where.with_suffix(".jsonl"), docs)
    return build_index(BuildOptions(source=str(src), out=where, progress=False, force=True), encoders=encoders,
                       log=lambda m: None)


def assert_same_results(a, b, modes=("dense", "bm25", "hybrid"), k: int = 8) -> None:
    """Equal pids and scores (to float rounding) for every question and mode; passages whose scores tie to
    rounding may trade places."""
    for mode in modes:
        for q in QUESTIONS:
            ha, hb = a.search([q], k, mode)[0], b.search([q], k, mode)[0]
            sa, sb = np.array([h.score for h in ha]), np.array([h.score for h in hb])
            assert len(ha) == len(hb), (mode, q)
            np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-5, err_msg=f"{mode} {q}")
            for i, (x, y) in enumerate(zip(ha, hb, strict=True)):
                if x.pid != y.pid:  # only among tied scores
                    ties = [h.pid for h in hb if abs(h.score - x.score) < 1e-5]
                    assert x.pid in ties, (mode, q, i, x.pid, y.pid)


def _edited(doc: dict, n: int) -> dict:
    return {**doc, "text": doc["text"] + f" Revision {n}: a zebra quantum lighthouse note."}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "update", "delete", "compact", "readd"]),
                              st.lists(st.integers(0, BASE_DOCS + POOL_DOCS - 1), min_size=1, max_size=4, unique=True)),
                    min_size=1, max_size=5))
def test_any_sequence_of_changes_searches_as_a_rebuild(ops, base_index, corpus, encoders, tmp_path_factory):
    """Random add / update / delete / compact sequences: dense, BM25 and hybrid results equal those of an index
    built from scratch over the live documents (in the order the changed index holds them); a deleted document
    never comes back."""
    from ragline.index.update import add_documents, compact_index, delete_documents
    from ragline.retriever import Retriever

    d = tmp_path_factory.mktemp("seq")
    ix = _copy(base_index, d / "ix")
    docs = corpus[0] + corpus[1]
    live = {x["id"]: x for x in corpus[0]}  # id -> record, in row order
    gone: set[str] = set()
    for step, (op, picks) in enumerate(ops):
        chosen = [docs[i] for i in picks]
        src = str(write_jsonl(d / f"s{step}.jsonl", chosen if op != "update" else [_edited(x, step) for x in chosen]))
        if op in ("add", "readd"):
            if any(x["id"] in live and live[x["id"]] != x for x in chosen):
                with pytest.raises(RaglineError, match="ragline update"):
                    add_documents(ix, [src], encoder=encoders.passage, log=lambda m: None)
                continue
            add_documents(ix, [src], encoder=encoders.passage, log=lambda m: None)
            for x in chosen:
                live.setdefault(x["id"], x)
        elif op == "update":
            add_documents(ix, [src], replace=True, encoder=encoders.passage, log=lambda m: None)
            for x in chosen:
                live.pop(x["id"], None)
                live[x["id"]] = _edited(x, step)
        elif op == "delete":
            ids = [x["id"] for x in chosen if x["id"] in live]
            if not ids:
                with pytest.raises(RaglineError, match="no live document"):
                    delete_documents(ix, [x["id"] for x in chosen], log=lambda m: None)
                continue
            delete_documents(ix, ids, log=lambda m: None)
            for i in ids:
                gone.add(i)
                live.pop(i)
        else:
            compact_index(ix, log=lambda m: None)
    if not live:
        return
    changed = Retriever(ix, encoders.question)
    scratch = Retriever(_scratch(list(live.values()), d / "scratch", encoders), encoders.question)
    assert changed.index.live_passages == len(scratch.index)
    assert_same_results(changed, scratch)
    k = changed.index.live_passages
    for mode in ("dense", "bm25"):
        hits = changed.search([docs[0]["title"]], k, mode)[0]
        assert not {h.doc_id for h in hits} & (gone - set(live))


def test_readding_unchanged_documents_is_a_noop(base_index, corpus, encoders, tmp_path):
    from ragline.index import manifest as mf
    from ragline.index.update import add_documents

    ix = _copy(base_index, tmp_path / "ix")
    before = (ix / mf.MANIFEST).read_bytes()
    change = add_documents(ix, [str(write_jsonl(tmp_path / "same.jsonl", corpus[0][:5]))], encoder=encoders.passage,
                           log=lambda m: None)
    assert change.unchanged == [x["id"] for x in corpus[0][:5]] and not change.changed
    assert (ix / mf.MANIFEST).read_bytes() == before and not (ix / mf.SEGMENTS).exists()


def test_new_metadata_alone_is_a_change(base_index, corpus, encoders, tmp_path):
    from ragline.index.registry import open_index
    from ragline.index.update import add_documents

    ix = _copy(base_index, tmp_path / "ix")
    doc = corpus[0][3]
    change = add_documents(ix, [str(write_jsonl(tmp_path / "m.jsonl", [{**doc, "metadata": {"team": "maps"}}]))],
                           replace=True, encoder=encoders.passage, log=lambda m: None)
    assert change.replaced == [doc["id"]]
    index = open_index(ix)
    row = index.store.row_of(f"{doc['id']}#0")
    assert index.store.get([row])[0].meta == {"team": "maps"}
    assert not index.alive[open_index(base_index).store.row_of(f"{doc['id']}#0")]  # the old row is deleted
    from ragline.retriever import Retriever

    hits = Retriever(index, encoders.question).search([doc["title"]], 3, "dense", filters=["team=maps"])[0]
    assert {h.doc_id for h in hits} == {doc["id"]} and hits[0].meta == {"team": "maps"}


def test_changes_are_refused_with_the_fix_and_nothing_written(base_index, corpus, encoders, tmp_path):
    from ragline.index import manifest as mf
    from ragline.index.update import add_documents, delete_documents

    ix = _copy(base_index, tmp_path / "ix")
    before = (ix / mf.MANIFEST).read_bytes()
    edited = write_jsonl(tmp_path / "edited.jsonl", [_edited(corpus[0][1], 0)])
    with pytest.raises(RaglineError, match="already in index.*use `ragline update`"):
        add_documents(ix, [str(edited)], encoder=encoders.passage, log=lambda m: None)
    with pytest.raises(RaglineError, match="no live document 'No such page'"):
        delete_documents(ix, [corpus[0][0]["id"], "No such page"], log=lambda m: None)
    twice = write_jsonl(tmp_path / "again.jsonl", [corpus[1][0]])
    with pytest.raises(RaglineError, match="in both"):
        add_documents(ix, [str(twice), str(twice)], encoder=encoders.passage, log=lambda m: None)
    assert (ix / mf.MANIFEST).read_bytes() == before
    assert not any((ix / mf.SEGMENTS).glob("*")) if (ix / mf.SEGMENTS).exists() else True


def test_history_fingerprints_and_an_index_built_before_term_counts(base_index, corpus, encoders, tmp_path):
    """Each generation has its own fingerprint and a history entry; an index without BM25 term counts (built by
    an earlier ragline) gets them counted on its first change."""
    from ragline.index import manifest as mf
    from ragline.index.registry import open_index
    from ragline.index.sparse import COUNTS, TERMS_FILE
    from ragline.index.update import add_documents, delete_documents

    ix = _copy(base_index, tmp_path / "ix")
    for name in (TERMS_FILE, *(f"{n}.npy" for n in COUNTS)):
        (ix / mf.BM25 / name).unlink()
    fps = [open_index(ix).fingerprint]
    add_documents(ix, [str(write_jsonl(tmp_path / "a.jsonl", corpus[1][:3]))], encoder=encoders.passage,
                  log=lambda m: None)
    fps.append(open_index(ix).fingerprint)
    delete_documents(ix, [corpus[1][0]["id"]], log=lambda m: None)
    index = open_index(ix)
    fps.append(index.fingerprint)
    assert len(set(fps)) == 3 and index.manifest["generation"] == 2
    hist = index.manifest["history"]
    assert [h["action"] for h in hist] == ["add", "delete"]
    assert hist[0]["added"]["ids"] == [x["id"] for x in corpus[1][:3]]
    assert hist[1]["deleted"]["ids"] == [corpus[1][0]["id"]] and hist[1]["passages"]["deleted"] >= 1
    assert index.live_passages == len(index) - hist[1]["passages"]["deleted"]


def test_cli_add_update_delete_compact(base_index, corpus, tmp_path):
    ix = _copy(base_index, tmp_path / "ix")

    def top(k: int) -> str:
        return run_cli("search", "--index", ix, "--mode", "bm25", "-k", k, "--json", "lighthouse Quendor")

    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "Zorblax", "title": "Zorblax",
                                                 "text": "Zorblax is a lighthouse keeper on the moon of Quendor."}])
    out = run_cli("add", "--index", ix, new)
    assert "1 added -> generation 1" in out
    assert "Zorblax#0" in top(1)
    assert "1 unchanged: nothing to write" in run_cli("add", "--index", ix, new)
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [{"id": "Zorblax", "title": "Zorblax",
                                                   "text": "Zorblax keeps the lighthouse on Quendor's second moon."}])
    assert "1 replaced -> generation 2" in run_cli("update", "--index", ix, fixed)
    assert "second moon" in top(1)
    assert "1 deleted -> generation 3" in run_cli("delete", "--index", ix, "--doc", "Zorblax")
    assert "Zorblax" not in top(3)
    assert "generation 4" in run_cli("compact", "--index", ix)
    manifest = json.loads((ix / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and not (ix / "segments").exists()
    assert [h["action"] for h in manifest["history"]] == ["add", "update", "delete", "compact"]


def test_changes_read_no_search_part(base_index, corpus, encoders, tmp_path, monkeypatch):
    """add, update, delete and compact open the index without its FAISS index and BM25 (nor the live BM25
    statistics): a change never searches it, and at 10M those are most of an open's time and memory."""
    from ragline.index import update
    from ragline.index.bm25_live import LiveBM25
    from ragline.index.dense import DenseIndex
    from ragline.index.registry import open_index
    from ragline.index.sparse import BM25Index
    from ragline.retriever import Retriever

    ix = _copy(base_index, tmp_path / "ix")
    first, second = corpus[1][:2], corpus[1][2:4]
    update.add_documents(ix, [str(write_jsonl(tmp_path / "a.jsonl", first))], encoder=encoders.passage,
                         log=lambda m: None)  # a segment and live statistics for the next opens to skip
    before = open_index(ix).live_passages

    def refused(*args, **kwargs):
        raise AssertionError("a change read a search part of the index")

    def guarded(real):  # what compact builds anew (in .ix.building) may be read back; the index itself not
        return classmethod(lambda cls, path, *a, **k: real.__func__(cls, path, *a, **k)
                           if ".building" in str(path) else refused())

    monkeypatch.setattr(DenseIndex, "load", guarded(DenseIndex.__dict__["load"]))
    monkeypatch.setattr(BM25Index, "load", guarded(BM25Index.__dict__["load"]))
    monkeypatch.setattr(LiveBM25, "__init__", refused)
    added = update.add_documents(ix, [str(write_jsonl(tmp_path / "b.jsonl", second))], encoder=encoders.passage,
                                 log=lambda m: None)
    edited = [{**first[0], "text": first[0]["text"] + " Edited."}]
    replaced = update.add_documents(ix, [str(write_jsonl(tmp_path / "c.jsonl", edited))], replace=True,
                                    encoder=encoders.passage, log=lambda m: None)
    deleted = update.delete_documents(ix, [second[0]["id"]], log=lambda m: None)
    assert (added.added, replaced.replaced, deleted.deleted) == ([d["id"] for d in second], [first[0]["id"]],
                                                                  [second[0]["id"]])
    update.compact_index(ix, log=lambda m: None)
    monkeypatch.undo()
    index = open_index(ix)  # compacted, searchable, every change in it
    live = update.live_documents(index)
    assert second[1]["id"] in live and first[0]["id"] in live and second[0]["id"] not in live
    assert index.live_passages < before + len(update.live_documents(index, only=[second[1]["id"]])[
        second[1]["id"]][0]) + 1
    hits = Retriever(index, encoders.question).search([first[0]["title"]], k=3, mode="bm25")[0]
    assert any(h.doc_id == first[0]["id"] and "Edited." in h.text for h in hits)


def test_kill_during_an_add_leaves_the_previous_generation(base_index, wiki_docs, encoders, tmp_path):
    """kill -9 while the new segment is being written: the index opens as before and searches as before; the
    next add removes what the killed one left and succeeds."""
    from ragline.index import manifest as mf
    from ragline.index.update import add_documents
    from ragline.retriever import Retriever

    ix = _copy(base_index, tmp_path / "ix")
    before = (ix / mf.MANIFEST).read_bytes()
    many = write_jsonl(tmp_path / "many.jsonl", [{**x, "id": f"copy-{i}"} for i, x in enumerate(wiki_docs * 4)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ragline", "add", "--index", str(ix), str(many)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = ix / mf.SEGMENTS / ".g000001.building"
    deadline = time.monotonic() + 180
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the add finished before it could be killed"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ix / mf.MANIFEST).read_bytes() == before
    assert_same_results(Retriever(ix, encoders.question), Retriever(base_index, encoders.question))
    add_documents(ix, [str(write_jsonl(tmp_path / "one.jsonl", wiki_docs[BASE_DOCS:BASE_DOCS + 1]))],
                  encoder=encoders.passage, log=lambda m: None)
    assert [p.name for p in (ix / mf.SEGMENTS).iterdir()] == ["g000001"]


def test_a_server_under_load_takes_up_20_generations_without_a_failed_request(base_index, corpus, encoders,
                                                                              tmp_path):
    import httpx

    from ragline.index.registry import open_index
    from ragline.index.update import add_documents, delete_documents
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app

    ix = _copy(base_index, tmp_path / "ix")
    app = create_app(RagModel(Retriever(ix), tiny_generator(), k=3), tmp_path)
    statuses: list[int] = []
    stop = threading.Event()
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        def load() -> None:
            while not stop.is_set():
                statuses.append(client.post("/search", json={"question": "lighthouse", "k": 3,
                                                              "mode": "hybrid"}).status_code)
                statuses.append(client.post("/ask", json={"question": "Who keeps the lighthouse?", "k": 3,
                                                          "model": "rag-token", "decoding": "greedy",
                                                          "max_new_tokens": 2}).status_code)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for g in range(20):
                doc = {"id": f"Keeper {g % 4}", "title": f"Keeper {g % 4}",
                       "text": f"Keeper {g % 4} tends lighthouse number {g} on the cliffs of Quendor."}
                if g % 5 == 4:
                    delete_documents(ix, [doc["id"]], log=lambda m: None)
                else:
                    add_documents(ix, [str(write_jsonl(tmp_path / f"g{g}.jsonl", [doc]))], replace=True,
                                  encoder=encoders.passage, log=lambda m: None)
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
        hits = client.post("/search", json={"question": "lighthouse number 18 Quendor", "k": 1,
                                            "mode": "bm25"}).json()["hits"]
        health = client.get("/health").json()["index"]
    assert len(statuses) > 20 and set(statuses) == {200}
    assert health["generation"] == 20 and health["passages"] == len(open_index(base_index)) + 3
    assert hits[0]["text"].startswith("Keeper 2 tends lighthouse number 18")


def test_a_sharded_index_changes_in_place_as_a_rebuild(sharded, wiki_docs, encoders, tmp_path, monkeypatch):
    """add / update / delete / compact on a sharded index (each document routed to its shard, shards opened on
    Ray): dense, BM25 (live statistics summed over the shards) and hybrid equal a single index built from scratch
    over the live documents in the same order; a retriever follows every generation."""
    from ragline.corpus.readers import read_corpus
    from ragline.index.update import live_documents
    from ragline.retriever import Retriever
    from ragline.scale.sharded import bm25_is_live, read_sharded_manifest
    from ragline.scale.update import _Shards, change_sharded, compact_sharded

    ix = _copy(sharded[0], tmp_path / "sh")
    extra = [{"id": d.id, "title": d.title, "text": d.text} for d in read_corpus("wiki-leads", limit=162)][150:]
    follower = Retriever(ix, encoders.question)
    docs = {x["id"]: x for x in wiki_docs}

    def check(step: str) -> None:
        follower.refresh()
        order = list(dict.fromkeys(d for index in _Shards(ix).indexes for d in live_documents(index)))
        scratch = Retriever(_scratch([docs[d] for d in order], tmp_path / f"scratch-{step}", encoders),
                            encoders.question)
        assert follower.index.live_passages == len(scratch.index), step
        assert_same_results(follower, scratch)

    change_sharded(ix, [str(write_jsonl(tmp_path / "a.jsonl", extra))], encoder=encoders.passage, log=lambda m: None)
    docs.update({x["id"]: x for x in extra})
    check("add")
    split = [d for d, (held, _) in _Shards(ix).live().items() if len(held) > 1]  # cut across two shards
    assert split, "the 3-shard build cut no document across shards"
    edited = [_edited(wiki_docs[2], 1), _edited(wiki_docs[100], 1), _edited(extra[0], 1), _edited(docs[split[0]], 1)]
    change_sharded(ix, [str(write_jsonl(tmp_path / "u.jsonl", edited))], replace=True, encoder=encoders.passage,
                   log=lambda m: None)
    docs.update({x["id"]: x for x in edited})
    check("update")
    gone = [wiki_docs[5]["id"], extra[3]["id"], split[-1] if len(split) > 1 else wiki_docs[140]["id"]]
    assert "3 deleted -> generation 3" in run_cli("delete", "--index", ix, *(a for d in gone for a in ("--doc", d)))
    for d in gone:
        docs.pop(d)
    check("delete")
    hits = follower.search([wiki_docs[5]["title"]], follower.index.live_passages, "bm25")[0]
    assert not {h.doc_id for h in hits} & set(gone)
    before = {s.get("dir", s["name"]) for s in read_sharded_manifest(ix)["shards"]}
    import ragline.index.build as build
    import ragline.scale.update as sharded_update

    opened, still_open = [], []  # each shard's opened index is let go before its replacement is built
    monkeypatch.setattr(sharded_update, "_Shards", lambda path: opened.append(_Shards(path)) or opened[-1])
    finish = build.finish_index
    monkeypatch.setattr(build, "finish_index", lambda *a, **kw: (
        still_open.append(sum(x is not None for x in opened[-1].indexes)), finish(*a, **kw))[1])
    compact_sharded(ix, log=lambda m: None)
    assert still_open == [2, 1, 0]
    monkeypatch.undo()
    check("compact")
    manifest = read_sharded_manifest(ix)
    assert manifest["generation"] == 4 and [h["action"] for h in manifest["history"]] == [
        "add", "update", "delete", "compact"]
    assert not any((ix / "shards" / d).exists() for d in before)
    assert not bm25_is_live(manifest)  # BM25 back to one round of precomputed scores, as after a build
    assert {s["manifest"]["bm25"]["corpus_passages"] for s in manifest["shards"]} == {manifest["live"]["passages"]}
    run_cli("delete", "--index", ix, "--doc", wiki_docs[7]["id"])
    docs.pop(wiki_docs[7]["id"])
    assert bm25_is_live(read_sharded_manifest(ix))  # changed again: live statistics until the next compact
    check("delete after compact")
