"""Scale-out on Ray: a sharded index built on a local Ray (2 CPUs) over the same slice as the shared single
index gives the same results in every mode; a shard actor killed mid-run is survived; an interrupted build
resumes with its finished shards kept; a missing shard is a clear error."""

import json
import shutil
import threading

import numpy as np
import pytest
from conftest import SLICE_DOCS, tiny_generator, write_jsonl

from ragline.errors import RaglineError
from ragline.index.sparse import BM25Index, BM25Stats
from ragline.index.topk import merge_top_k

QUESTIONS = ["Roman emperor architecture", "Which river flows through Baghdad?", "painter of the Mona Lisa",
             "Gothic cathedral in France", "ancient Greek temple columns", "Who built the pyramids?"]


def test_merge_of_shard_top_k_equals_the_global_top_k():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 60)).astype(np.float32)
    scores[:, 10] = scores[:, 40]  # a tie across shards: the lower row wins, as in one index
    cuts = [0, 25, 45, 60]
    for k in (1, 5, 30):
        parts = []
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            kk = min(k, hi - lo)
            local = np.argsort(-scores[:, lo:hi], axis=1, kind="stable")[:, :kk]
            parts.append((np.take_along_axis(scores[:, lo:hi], local, 1), local + lo))
        parts.append((np.zeros((4, 3), np.float32), np.full((4, 3), -1)))  # a shard with no hits
        s, r = merge_top_k(parts, k)
        want = np.lexsort((np.tile(np.arange(60), (4, 1)), -scores), axis=1)[:, :k]
        assert np.array_equal(r, want) and np.allclose(s, np.take_along_axis(scores, want, 1))
    s, r = merge_top_k([(np.array([[2.0]]), np.array([[7]]))], 3)  # fewer hits than k: -1 after them
    assert r.tolist() == [[7, -1, -1]] and s.tolist() == [[2.0, 0.0, 0.0]]


def test_bm25_shards_with_corpus_statistics_score_as_one_index(tmp_path, wiki_docs):
    from ragline.corpus.passages import encoder_text, split_documents
    from ragline.corpus.readers import Document

    texts = [encoder_text(p.title, p.text)
             for p in split_documents([Document(d["id"], d["title"], d["text"]) for d in wiki_docs], 100)]
    whole = BM25Index.build([texts], tmp_path / "whole")
    cuts = [0, 70, 71, len(texts)]  # uneven, one shard of a single passage
    stats = BM25Stats()
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        stats = stats + BM25Stats.of([texts[lo:hi]])
    assert stats.passages == len(texts)
    shards = [BM25Index.build([texts[lo:hi]], tmp_path / f"s{i}", corpus_stats=stats)
              for i, (lo, hi) in enumerate(zip(cuts, cuts[1:], strict=False))]
    assert all(x.ntotal == hi - lo for x, lo, hi in zip(shards, cuts, cuts[1:], strict=False))
    parts = []
    for i, lo in enumerate(cuts[:-1]):
        s, r = BM25Index.load(tmp_path / f"s{i}").search(QUESTIONS, 10)  # as saved
        parts.append((s, np.where(r >= 0, r + lo, -1)))
    s, r = merge_top_k(parts, 10)
    ws, wr = whole.search(QUESTIONS, 10)
    assert np.array_equal(r, wr) and np.allclose(s, ws, rtol=1e-6)
    plain = BM25Index.build([texts[:70]], tmp_path / "plain").search(QUESTIONS, 10)[0]
    assert not np.allclose(plain, parts[0][0], rtol=1e-6)  # without the statistics the scores differ


def test_interrupted_build_resumes_keeping_finished_shards(sharded):
    out, first, second, name, inode = sharded
    assert f"{name}: complete, kept" in second
    assert (out / "shards" / name / "embeddings.npy").stat().st_ino == inode  # not rebuilt
    assert any("sharded index ready" in m for m in second)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-0000", "shard-0001", "shard-0002"]


def test_sharded_results_equal_the_single_index(sharded, small_index):
    from ragline.retriever import Retriever

    single, many = Retriever(small_index), Retriever(sharded[0])
    assert len(many.index) == len(single.index) and many.index.modes == single.index.modes
    for mode in ("dense", "bm25", "hybrid"):
        for k in (1, 5, 25):
            a, b = single.retrieve(QUESTIONS, k, mode), many.retrieve(QUESTIONS, k, mode)
            assert np.array_equal(a.rows, b.rows), (mode, k)
            assert np.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6), (mode, k)
    hits_a, hits_b = single.search(QUESTIONS[:2], 5, "hybrid"), many.search(QUESTIONS[:2], 5, "hybrid")
    assert [[h.pid for h in q] for q in hits_a] == [[h.pid for h in q] for q in hits_b]
    rows = np.array([[0, len(single.index) - 1], [3, 70]])
    assert np.allclose(single.index.embeddings[rows.reshape(-1)], many.index.embeddings[rows].reshape(4, -1))
    pid = hits_a[0][0].pid
    assert many.index.store.row_of(pid) == single.index.store.row_of(pid) and many.index.store.row_of("x#9") is None
    for filters in ([f"title!={hits_a[0][0].title}"], [f"doc_id={hits_a[0][1].doc_id}", f"pid={hits_a[1][0].pid}"]):
        for mode in ("dense", "bm25", "hybrid"):  # each shard searches its slice of the filter's rows
            a, b = single.retrieve(QUESTIONS, 5, mode, filters=filters), many.retrieve(QUESTIONS, 5, mode,
                                                                                        filters=filters)
            assert np.array_equal(a.rows, b.rows), (mode, filters)


def test_given_vectors_build_a_sharded_index_row_for_row(tmp_path, small_index, ray_local):
    """``index --ray --embeddings``: each shard holds exactly its rows of the given vectors (two files whose
    boundary falls inside a shard), searches as the single index does, resumes only with the same files, and
    a wrong count is refused before anything is built."""
    from ragline.index.build import BuildOptions
    from ragline.retriever import Retriever
    from ragline.scale.build import build_sharded

    emb = np.load(small_index / "embeddings.npy")  # (n, dim) float32
    vecs = tmp_path / "vectors"
    vecs.mkdir()
    np.save(vecs / "part-1.npy", emb[:37])
    np.save(vecs / "part-2.npy", emb[37:])
    out = tmp_path / "given"
    opts = BuildOptions(source="wiki-leads", out=out, limit=SLICE_DOCS, embeddings=str(vecs), progress=False)
    first, second = [], []

    def stop(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_sharded(opts, shards=3, log=first.append, after_shard=stop)
    assert not any("encoded by" in m for m in first)  # nothing encoded: the given vectors are used
    np.save(vecs / "part-2.npy", emb[37:])  # written again: other files, so the shards start over
    build_sharded(opts, shards=3, log=second.append)
    assert any("changed since the interrupted build" in m for m in second)
    assert not any("kept" in m or "encoded by" in m for m in second)
    top = json.loads((out / "manifest.json").read_text())
    assert top["encoder"]["passage"]["embeddings"] == str(vecs.resolve())
    for shard in top["shards"]:
        lo, hi = shard["offset"], shard["offset"] + shard["passages"]
        assert np.array_equal(np.load(out / "shards" / shard["name"] / "embeddings.npy"), emb[lo:hi])
    assert 37 not in [shard["offset"] for shard in top["shards"]]  # a shard takes rows of both files
    single, many = Retriever(small_index), Retriever(out)
    a, b = single.retrieve(QUESTIONS, 10, "dense"), many.retrieve(QUESTIONS, 10, "dense")
    assert np.array_equal(a.rows, b.rows) and np.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)

    np.save(vecs / "part-2.npy", emb[37:-1])
    with pytest.raises(RaglineError) as e:
        build_sharded(BuildOptions(source="wiki-leads", out=tmp_path / "short", limit=SLICE_DOCS,
                                   embeddings=str(vecs), progress=False), shards=3, log=lambda m: None)
    assert f"hold {len(emb) - 1} vectors but the corpus has {len(emb)} passages" in e.value.problem
    assert not (tmp_path / "short").exists()


def test_rag_answers_through_the_sharded_index_as_through_one(sharded, small_index):
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever

    gen = tiny_generator()
    for model in ("rag-token", "rag-sequence"):
        a = RagModel(Retriever(small_index), gen, k=3).answer(QUESTIONS[:2], model=model, max_new_tokens=4)
        b = RagModel(Retriever(sharded[0]), gen, k=3).answer(QUESTIONS[:2], model=model, max_new_tokens=4)
        assert [x.text for x in a] == [x.text for x in b]
        assert [[s.pid for s in x.sources] for x in a] == [[s.pid for s in x.sources] for x in b]
        assert np.allclose([s.prior for x in a for s in x.sources], [s.prior for x in b for s in x.sources],
                           atol=1e-5)


def test_a_shard_actor_killed_mid_run_is_restarted_and_the_query_retried(sharded, small_index, ray_local):
    from ragline.retriever import Retriever

    ray = ray_local
    many = Retriever(sharded[0])
    want = Retriever(small_index).retrieve(QUESTIONS, 5, "hybrid").rows
    before = ray.get(many.index.actors[1].pid.remote())
    results, errors = [], []

    def load():
        try:
            for _ in range(40):
                results.append(many.retrieve(QUESTIONS, 5, "hybrid").rows)
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    t = threading.Thread(target=load)
    t.start()
    while len(results) < 3:
        t.join(0.05)
    ray.kill(many.index.actors[1], no_restart=False)  # the process dies; Ray restarts it
    t.join()
    assert errors == [] and len(results) == 40 and all(np.array_equal(r, want) for r in results)
    assert ray.get(many.index.actors[1].pid.remote()) != before  # a new process serves the shard


def test_a_missing_shard_is_a_clear_error_never_a_smaller_corpus(sharded, tmp_path, ray_local):
    from ragline.index.registry import list_indexes
    from ragline.retriever import Retriever

    copy = tmp_path / "broken"
    shutil.copytree(sharded[0], copy)
    shutil.rmtree(copy / "shards" / "shard-0001")
    with pytest.raises(RaglineError) as e:
        Retriever(copy)
    assert "shard shard-0001" in e.value.problem and "missing" in e.value.problem and e.value.fix
    assert [p.name for p, _ in list_indexes(sharded[0].parent)] == [sharded[0].name]  # listed like any index


def test_a_jsonl_corpus_is_read_in_parallel_shards_and_searches_as_one_index(tmp_path, wiki_docs, small_index,
                                                                            ray_local):
    from ragline.index.build import BuildOptions
    from ragline.retriever import Retriever
    from ragline.scale.build import build_sharded

    src = write_jsonl(tmp_path / "corpus.jsonl", wiki_docs)  # the shared slice's documents, as a file
    logs = []
    out = build_sharded(BuildOptions(source=str(src), out=tmp_path / "from-jsonl", progress=False), shards=3,
                        log=logs.append)
    assert any("150 documents" in m and "read in 3 parallel shards" in m for m in logs)
    single, many = Retriever(small_index), Retriever(out)
    for mode in ("dense", "bm25"):
        a, b = single.retrieve(QUESTIONS, 10, mode), many.retrieve(QUESTIONS, 10, mode)
        assert np.array_equal(a.rows, b.rows) and np.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert many.index.store.get([0, len(many.index) - 1]) == single.index.store.get([0, len(single.index) - 1])


def test_bad_lines_in_a_parallel_read_are_reported_with_their_file_line(tmp_path, wiki_docs, ray_local):
    from ragline.index.build import BuildOptions
    from ragline.scale.build import build_sharded

    lines = [json.dumps(d) for d in wiki_docs[:40]]
    lines[30] = "{not json"
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    opts = BuildOptions(source=str(src), out=tmp_path / "bad", dense=False, progress=False)
    with pytest.raises(RaglineError) as e:
        build_sharded(opts, shards=3, log=lambda m: None)
    assert f"{src}:31: not valid JSON" in e.value.problem and "--skip-bad" in e.value.fix
    assert not (tmp_path / "bad").exists()
    lines[30] = json.dumps(wiki_docs[2])  # the same id as line 3, in another shard
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(RaglineError) as e:
        build_sharded(opts, shards=3, log=lambda m: None)
    assert "1 document ids appear more than once" in e.value.problem


def test_the_clusters_messages_go_to_stderr_not_into_the_commands_output():
    """Ray's driver prints the raylet's warnings to stdout (is_err False); ragline marks them as errors, which
    Ray prints to stderr, so that `ask --json` and the other commands' stdout stays theirs (a raylet warning
    once broke a test's JSON). Ray's own printer is not called here: it drops lines it printed before."""
    from types import SimpleNamespace

    from ragline.scale import cluster

    printed = []
    worker = SimpleNamespace(print_to_stdstream=lambda data, ignore_prefix: printed.append(data))
    fake_ray = SimpleNamespace(_private=SimpleNamespace(worker=worker))
    cluster.messages_to_stderr(fake_ray)
    wrapped = worker.print_to_stdstream
    cluster.messages_to_stderr(fake_ray)  # wrapped once, however often a command connects
    assert worker.print_to_stdstream is wrapped
    wrapped({"lines": ["WARNING: 14 PYTHON worker processes"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == [{"lines": ["WARNING: 14 PYTHON worker processes"], "pid": "raylet", "is_err": True}]
    cluster.messages_to_stderr(SimpleNamespace())  # a Ray without that printer: left as it is
    ray = pytest.importorskip("ray")
    assert callable(ray._private.worker.print_to_stdstream)  # the installed Ray has the printer wrapped
