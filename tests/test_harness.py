"""``ragline eval`` end to end on the small index with the small generator: predictions, report, resume,
refusal of a different configuration, compare, and bad task files through the CLI."""

import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from ragline.errors import RaglineError
from ragline.evaluate.answers import EvalConfig, run_eval
from ragline.evaluate.report import compare


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, wiki_docs):
    docs = wiki_docs[:3]
    recs = [{"id": f"q{i}", "input": f"What is {d['title']}?",
             "output": [{"answer": d["title"], "provenance": [{"wikipedia_id": d["id"], "title": d["title"]}]}]}
            for i, d in enumerate(docs)]
    return write_jsonl(tmp_path_factory.mktemp("task") / "mini-kilt.jsonl", recs)


def _cfg(task_file, small_index, **kw):
    base = dict(task=str(task_file), index=str(small_index), model="rag-token", decoding="greedy", k=2,
                generator="smollm2", max_new_tokens=6, batch=2)
    return EvalConfig(**{**base, **kw})


def test_eval_writes_kilt_predictions_and_a_report_and_resumes(tmp_path, task_file, small_index):
    out = tmp_path / "run"
    report = run_eval(_cfg(task_file, small_index), out, progress=False, log=lambda m: None)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["q0", "q1", "q2"]
    prov = preds[0]["output"][0]["provenance"]
    assert len(prov) == 2 and {"title", "pid", "prior", "posterior"} <= set(prov[0])
    assert "wikipedia_id" not in prov[0]  # the bundled leads' document ids are titles, not Wikipedia ids
    assert abs(sum(p["prior"] for p in prov) - 1) < 1e-3
    m = report["metrics"]
    assert m["questions"] == m["answered"] == 3
    # "What is <title>?" against that page's own lead: dense retrieval ranks the page first
    assert m["r_precision"] == 1.0 and m["recall@1"] == 1.0
    assert report["index"]["fingerprint"] and report["config"]["k"] == 2
    for name in ("report.json", "report.md", "metrics.png", "config.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert "| em |" in (out / "report.md").read_text()

    # an interrupted run: one complete line and half of the next; the resume answers the rest only
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text(lines[0] + lines[1][:25])
    (out / "report.json").unlink()
    logs = []
    again = run_eval(_cfg(task_file, small_index), out, progress=False, log=logs.append)
    assert any("1 of 3 questions already answered" in x for x in logs)
    resumed = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in resumed] == ["q0", "q1", "q2"]
    assert [p["output"][0]["answer"] for p in resumed] == [p["output"][0]["answer"] for p in preds]
    assert again["metrics"]["em"] == report["metrics"]["em"]

    with pytest.raises(RaglineError, match=r"other settings \(k\)"):
        run_eval(_cfg(task_file, small_index, k=3), out, progress=False, log=lambda m: None)

    closed = run_eval(_cfg(task_file, small_index, model="closed-book", k=1), tmp_path / "cb", progress=False,
                      log=lambda m: None)
    assert "r_precision" in closed["metrics"] and closed["metrics"]["kilt_em"] == 0.0
    table = compare([out, tmp_path / "cb"], tmp_path / "cmp.png")
    assert "| run | system |" in table and "rag-token greedy, dense k=2" in table and "closed-book" in table
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_reports_a_malformed_task_line(tmp_path, small_index):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answers": ["x"]}\n{"question": \n')
    r = subprocess.run([sys.executable, "-m", "ragline", "eval", "--task", str(bad), "--index", str(small_index),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:2: not valid JSON" in r.stderr and "--skip-bad" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ragline", "compare", str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no report.json" in r.stderr
