"""Index directories: manifest, atomic replacement, resume after a kill, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from ragline.errors import RaglineError
from ragline.index.build import STATE, BuildOptions, build_index
from ragline.index.directory import IndexDir
from ragline.index.registry import list_indexes
from ragline.retriever import Retriever


def _build(out, encoders, **kw):
    logs = []
    kw.setdefault("limit", 40)
    kw.setdefault("progress", False)
    build_index(BuildOptions(source=kw.pop("source", "wiki-leads"), out=out, **kw), encoders=encoders,
                log=logs.append)
    return logs


def test_manifest_records_what_loading_checks(small_index):
    m = json.loads((small_index / "manifest.json").read_text())
    assert m["corpus"]["passages"] == len(IndexDir.open(small_index)) and m["corpus"]["format"] == "wiki-leads"
    assert m["encoder"]["dim"] == 384 and m["encoder"]["passage"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert m["dense"]["type"] == "flat" and m["bm25"]["documents"] == m["corpus"]["passages"]
    assert m["dense"]["chosen"].startswith("auto: ") and "exact search" in m["dense"]["chosen"]  # the default
    assert len(m["corpus"]["fingerprint"]) == 32 and m["created_at"]
    # no build leftovers; the lock file stays (unlinking it while held let two builds run: atomic.exclusive_lock)
    assert not [p for p in small_index.parent.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]


def test_existing_index_needs_force_and_other_dirs_are_never_touched(tmp_path, encoders):
    out = tmp_path / "idx"
    _build(out, encoders, limit=10)
    fp = IndexDir.open(out).fingerprint
    with pytest.raises(RaglineError, match="already exists; pass --force"):
        _build(out, encoders, limit=12)
    assert IndexDir.open(out).fingerprint == fp
    _build(out, encoders, limit=12, force=True)
    assert IndexDir.open(out).fingerprint != fp and len(IndexDir.open(out)) > 10
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(RaglineError, match="is not a ragline index; choose another --out"):
        _build(mine, encoders, force=True)
    assert (mine / "keep.txt").read_text() == "precious"


def test_bad_corpus_fails_cleanly_and_keeps_the_old_index(tmp_path, encoders):
    out = tmp_path / "idx"
    _build(out, encoders, limit=10)
    fp = IndexDir.open(out).fingerprint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": ""}\n')
    with pytest.raises(RaglineError, match="bad.jsonl:2: record has an empty"):
        _build(out, encoders, source=str(bad), force=True)
    assert IndexDir.open(out).fingerprint == fp
    # nothing half-written (the build's lock file stays: atomic.exclusive_lock never unlinks it)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["bad.jsonl", "idx"]
    with pytest.raises(RaglineError, match="unknown index type"):
        _build(tmp_path / "x", encoders, index_type="annoy")
    logs = _build(tmp_path / "skipping", encoders, source=str(bad), skip_bad=True)
    assert "1 bad records skipped" in logs[0] and len(IndexDir.open(tmp_path / "skipping")) == 1


def test_every_input_format_builds_a_searchable_index(tmp_path, encoders, wiki_docs):
    docs = wiki_docs[:12]
    jsonl = write_jsonl(tmp_path / "c.jsonl", docs)
    kilt = write_jsonl(tmp_path / "k.jsonl", [{"wikipedia_id": d["id"], "wikipedia_title": d["title"],
                                               "text": [d["title"] + "\n", *d["text"].split("\n")]} for d in docs])
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.md").write_text(f"# {d['title']}\n\n{d['text']}\n")
    for name, src in [("jsonl", jsonl), ("kilt", kilt), ("files", folder)]:
        out = tmp_path / f"idx-{name}"
        _build(out, encoders, source=str(src), limit=None, passage_words=50)
        r = Retriever(out, encoders.question)
        assert r.index.manifest["corpus"]["format"] == name
        hit = r.search(["Who directed 2001: A Space Odyssey?"], k=1, mode="hybrid")[0][0]
        assert hit.title == "2001: A Space Odyssey", name
        assert max(len(p.text.split()) for p in r.index.store.get(range(len(r.index)))) <= 50


def test_approximate_index_types_reuse_sibling_embeddings(tmp_path, encoders):
    _build(tmp_path / "flat", encoders, limit=60)
    logs = _build(tmp_path / "hnsw", encoders, limit=60, index_type="hnsw", bm25=False)
    assert any("reusing the passage embeddings of flat" in m for m in logs)
    assert any("recall@10 vs exact" in m for m in logs)
    a, b = IndexDir.open(tmp_path / "flat"), IndexDir.open(tmp_path / "hnsw")
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert b.manifest["dense"]["recall_at_10_vs_exact"] >= 0.95
    assert [p.name for p, _ in list_indexes(tmp_path)] == ["flat", "hnsw"]


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ragline", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_kill_mid_build_keeps_the_old_index_and_the_rerun_resumes(tmp_path, encoders):
    out = tmp_path / "idx"
    _build(out, encoders, limit=10)
    old_fp = IndexDir.open(out).fingerprint
    args = ["index", "--out", str(out), "--limit", "300", "--chunk-rows", "16", "--force"]
    proc = _cli(*args)
    state = tmp_path / ".idx.building" / STATE
    deadline = time.monotonic() + 180
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(state.read_text()).get("encoded_rows", 0)
        except (OSError, ValueError):
            done = 0
        if done >= 48:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the interrupted build is invisible: the old index still loads and answers
    r = Retriever(out, encoders.question)
    assert r.index.fingerprint == old_fp and len(r.index) < 48
    assert r.search(["Who directed 2001: A Space Odyssey?"], k=1)[0][0].title == "2001: A Space Odyssey"
    assert [p.name for p, _ in list_indexes(tmp_path)] == ["idx"]
    # the same command again resumes the encoding where the checkpoint says
    proc = _cli(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    resumed = int(err.split("resuming the encoding at passage ")[1].split()[0])
    assert resumed >= 48 and resumed % 16 == 0
    new = IndexDir.open(out)
    assert new.fingerprint != old_fp and not (tmp_path / ".idx.building").exists()
    # the resumed embeddings equal a build from scratch
    fresh = tmp_path / "fresh"
    _build(fresh, encoders, limit=300, bm25=False)
    np.testing.assert_allclose(new.embeddings, IndexDir.open(fresh).embeddings, atol=2e-5)


def test_missing_or_damaged_index_is_a_clear_error(tmp_path, small_index):
    with pytest.raises(RaglineError, match="does not exist; build it with `ragline index"):
        IndexDir.open(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(RaglineError, match="not a complete ragline index"):
        IndexDir.open(tmp_path / "half")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_index, broken)
    np.save(broken / "embeddings.npy", np.zeros((3, 384), dtype=np.float32))
    with pytest.raises(RaglineError, match="is damaged: embeddings.npy has shape"):
        IndexDir.open(broken)


def test_cli_errors_are_one_line_with_a_fix_and_exit_2(tmp_path, small_index):
    cases = [
        (["search", "x", "--index", str(tmp_path / "none")], "does not exist; build it with"),
        (["search", "   ", "--index", str(small_index)], "question 1 is empty; give a non-empty question"),
        (["search", "x", "-k", "100000", "--index", str(small_index)], "is larger than index"),
        (["index", "--source", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], "does not exist"),
    ]
    procs = [(_cli(*args), msg) for args, msg in cases]
    for proc, msg in procs:
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, (err, out)
        assert lines[-1].startswith("error: ") and msg in lines[-1], err
    assert not (tmp_path / "o").exists() and not list(Path(tmp_path).glob(".o*"))


def test_cli_search_and_eval(small_index, tmp_path):
    proc = _cli("search", "Who directed the film 2001: A Space Odyssey?", "--index", str(small_index), "-k", "2",
                "--mode", "hybrid", "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    rec = json.loads(out.splitlines()[0])
    assert rec["hits"][0]["title"] == "2001: A Space Odyssey" and len(rec["hits"]) == 2
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "Who wrote Candide?", "gold_titles": ["Candide"]},
                                           {"question": "Who painted it?", "gold_titles": ["Not In Corpus"]}])
    proc = _cli("eval-retrieval", "--index", str(small_index), "--questions", str(q), "-k", "1", "-k", "5",
                "--json-out", str(tmp_path / "m.json"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "1 of 2 questions with gold pages" in err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 1 and m["metrics"]["dense"]["recall@5"] == 1.0 and set(m["metrics"]) == {"dense", "bm25", "hybrid"}


def test_demo_builds_the_default_index_then_answers_with_sources(tmp_path):
    env = {**os.environ, "RAGLINE_HOME": str(tmp_path / "home")}
    proc = _cli("demo", "--limit", "30", "--generator", "smollm2", "--mode", "dense", env=env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "building the default index" in err and "index ready" in err
    assert "Answer:" in out and "Kub" in out and "2001: A Space Odyssey" in out and "Sources" in out
    assert IndexDir.open(tmp_path / "home" / "indexes" / "wiki-leads").manifest["corpus"]["documents"] == 30
    proc = _cli("demo", "What is Art Deco?", "--limit", "30", "--generator", "smollm2", env=env)  # no build now
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "building" not in err, err
    assert "Art Deco" in out


def test_bm25_only_index_needs_no_encoder(tmp_path):
    out = tmp_path / "bm25-only"
    _build(out, None, limit=30, dense=False)
    r = Retriever(out)
    assert r.encoder is None and r.index.modes == ("bm25",)
    assert r.search(["Who directed 2001: A Space Odyssey?"], k=1, mode="bm25")[0][0].title == "2001: A Space Odyssey"
    with pytest.raises(RaglineError, match="cannot do dense retrieval"):
        r.search(["x"], k=1, mode="dense")
