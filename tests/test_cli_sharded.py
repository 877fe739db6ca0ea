"""Every command that takes ``--index`` runs on a sharded index (``ragline index --ray``) and, where it reads
the index's contents, gives what the same command gives on the single index over the same corpus.

The commands run in this process (click's runner) on the session's local Ray, with the tiny generator."""

import json

import pytest
from conftest import run_cli

from ragline.models.tiny import save_tiny_causal

QUESTION = "Who painted the Mona Lisa?"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_causal(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_search_and_eval_retrieval(sharded, small_index, tmp_path):
    sharded_index = sharded[0]
    hits = [json.loads(run_cli("search", QUESTION, "--index", ix, "-k", 5, "--mode", "hybrid", "--json"))["hits"]
            for ix in (small_index, sharded_index)]
    assert [h["pid"] for h in hits[0]] == [h["pid"] for h in hits[1]]
    metrics = []
    for name, ix in (("single", small_index), ("sharded", sharded_index)):
        run_cli("eval-retrieval", "--index", ix, "-k", 1, "-k", 5, "--json-out", tmp_path / f"{name}.json")
        metrics.append(json.loads((tmp_path / f"{name}.json").read_text())["metrics"])
    for mode in ("dense", "bm25", "hybrid"):
        for key in ("recall@1", "recall@5", "r_precision"):
            assert metrics[0][mode][key] == pytest.approx(metrics[1][mode][key]), (mode, key)


def test_ask_eval_and_report(sharded, small_index, tiny_folder, tmp_path):
    common = ["--generator", tiny_folder, "-k", 2, "--max-new-tokens", 3]
    answers = [json.loads(run_cli("ask", QUESTION, "--index", ix, "--model", "rag-token", "--json", *common))
               for ix in (small_index, sharded[0])]
    assert answers[0]["text"] == answers[1]["text"]
    assert [s["pid"] for s in answers[0]["sources"]] == [s["pid"] for s in answers[1]["sources"]]
    run_cli("eval", "--index", sharded[0], "--task", "fanoutqa-dev", "--limit", 2, "--out",
            tmp_path / "eval", *common)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metrics"]["answered"] == 2 and report["index"]["name"] == sharded[0].name
    run_cli("report", "--index", sharded[0], "--task", "fanoutqa-dev", "--limit", 1, "--generator",
            tiny_folder, "--max-new-tokens", 2, "--out", tmp_path / "report")
    assert "rag-sequence thorough, hybrid k=5" in (tmp_path / "report" / "README.md").read_text()


def test_train_rag_and_retriever_and_their_runs_settings(sharded, tiny_folder, tmp_path):
    run_cli("train", "rag", "--index", sharded[0], "--generator", tiny_folder, "--model", "rag-token", "-k", 2,
            "--prior-scale", 5, "--steps", 1, "--batch-size", 2, "--val-limit", 2, "--eval-every", 1, "--save-every", 1,
            "--out", tmp_path / "rag")
    info = json.loads((tmp_path / "rag" / "final" / "run.json").read_text())
    assert info["index"] == str(sharded[0]) and info["mode"] == "dense" and info["prior_scale"] == 5
    # ask --run takes the run's model, k, prior scale and index, unless given on the command line
    a = json.loads(run_cli("ask", QUESTION, "--run", tmp_path / "rag", "--max-new-tokens", 2, "--json"))
    assert a["model"] == "rag-token" and len(a["sources"]) == 2
    scores = [s["score"] for s in a["sources"]]
    top = max(scores)
    expect = [2.718281828 ** (5 * (x - top)) for x in scores]
    assert [s["prior"] for s in a["sources"]] == pytest.approx([e / sum(expect) for e in expect], rel=1e-4)
    b = json.loads(run_cli("ask", QUESTION, "--run", tmp_path / "rag", "-k", 3, "--model", "rag-sequence",
                           "--max-new-tokens", 2, "--json"))
    assert b["model"] == "rag-sequence" and len(b["sources"]) == 3
    # eval --run likewise: the run's generator, model, k, prior scale and index
    run_cli("eval", "--run", tmp_path / "rag", "--task", "fanoutqa-dev", "--limit", 1, "--max-new-tokens", 2,
            "--out", tmp_path / "eval-run")
    config = json.loads((tmp_path / "eval-run" / "config.json").read_text())
    assert config["generator"] == str(tmp_path / "rag" / "final" / "generator") and config["model"] == "rag-token"
    assert config["k"] == 2 and config["prior_scale"] == 5 and config["index"] == str(sharded[0])

    run_cli("train", "retriever", "--index", sharded[0], "--steps", 1, "--batch-size", 2, "--eval-every", 1,
            "--save-every", 1, "--out", tmp_path / "dpr")
    trained = tmp_path / "dpr" / "final" / "question_encoder"
    assert trained.is_dir()
    # a trained retriever's effect on answers: eval takes --query-encoder as search and ask do
    run_cli("eval", "--index", sharded[0], "--task", "fanoutqa-dev", "--limit", 1, "--generator",
            tiny_folder, "-k", 2, "--max-new-tokens", 2, "--query-encoder", trained, "--out", tmp_path / "eval-dpr")
    report = json.loads((tmp_path / "eval-dpr" / "report.json").read_text())
    assert report["config"]["query_encoder"] == str(trained) and report["metrics"]["answered"] == 1


def test_serve(sharded, tiny_folder, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app))
    run_cli("serve", "--index", sharded[0], "--generator", tiny_folder)
    client = TestClient(served["app"], base_url="http://localhost")  # a host the server answers
    health = client.get("/health").json()
    assert health["index"]["name"] == sharded[0].name and health["index"]["modes"] == ["dense", "bm25", "hybrid"]
    r = client.post("/ask", json={"question": QUESTION, "k": 2, "model": "rag-token", "decoding": "greedy",
                                  "max_new_tokens": 2})
    assert r.status_code == 200 and len(r.json()["sources"]) == 2
    pid = r.json()["sources"][0]["pid"]
    assert client.get(f"/passages/{pid.replace('#', '%23')}").json()["pid"] == pid
