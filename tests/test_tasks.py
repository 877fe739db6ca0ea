"""Task readers for the paper's datasets, on small files written here in each public format."""

import json

import pytest

from ragline.errors import RaglineError
from ragline.evaluate.scoring import retrieval_metrics, score_run
from ragline.questions import Page, Question, detect_format, load_task, titled


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_kilt_file_with_provenance_sets(tmp_path):
    recs = [{"id": "q1", "input": "Who wrote Candide?", "output": [
                {"answer": "Voltaire", "provenance": [{"wikipedia_id": "1", "title": "Candide"}]},
                {"answer": "François-Marie Arouet", "provenance": [{"wikipedia_id": "2", "title": "Voltaire"},
                                                                  {"wikipedia_id": "1", "title": "Candide"}]}]},
            {"id": "q2", "input": "Capital of France?", "output": [{"answer": "Paris"}]}]
    p = _write(tmp_path / "nq-dev-kilt.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    assert detect_format(p) == "kilt"
    t = load_task(p)
    assert (t.format, t.kind, [q.id for q in t.questions]) == ("kilt", "qa", ["q1", "q2"])
    assert t.questions[0].answers == ("Voltaire", "François-Marie Arouet")
    assert t.questions[0].provenance == ((Page("1", "Candide"),), (Page("2", "Voltaire"), Page("1", "Candide")))
    assert t.questions[0].gold_titles == ("Candide", "Voltaire") and t.questions[1].provenance == ()
    fever = _write(tmp_path / "fever-dev-kilt.jsonl", json.dumps(
        {"id": "f", "input": "Paris is in Italy.", "output": [{"answer": "REFUTES"}]}) + "\n")
    assert load_task(fever).kind == "label"


def test_dpr_csv_nq_trivia_webq_and_curatedtrec(tmp_path):
    p = _write(tmp_path / "nq-test.qa.csv", "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
               "when was the last time anyone was on the moon\t['14 December 1972 UTC', 'December 1972']\n")
    t = load_task(p)
    assert (t.format, t.kind) == ("dpr-qa", "qa")
    assert t.questions[1].answers == ("14 December 1972 UTC", "December 1972")
    trec = _write(tmp_path / "curatedtrec-test.txt", "What is the capital of Turkey?\t['Ankara']\n"
                  "Who invented the telephone?\t['(Alexander )?(Graham )?Bell']\n")
    t = load_task(trec)
    assert (t.format, t.kind) == ("curatedtrec", "regex")
    assert score_run(t.questions, t.kind, {
        t.questions[0].id: {"output": [{"answer": "Ankara"}]},
        t.questions[1].id: {"output": [{"answer": "Graham Bell"}]}})["em"] == 1.0


def test_triviaqa_webquestions_msmarco_json(tmp_path):
    tqa = _write(tmp_path / "unfiltered-web-dev.json", json.dumps({"Data": [
        {"QuestionId": "tc_1", "Question": "Which Lloyd Webber musical premiered in 1976?",
         "Answer": {"Value": "Evita", "Aliases": ["Evita", "Evita (musical)"]}}]}))
    t = load_task(tqa)
    assert (t.format, t.questions[0].id, t.questions[0].answers) == ("triviaqa", "tc_1", ("Evita", "Evita (musical)"))
    webq = _write(tmp_path / "webquestions.examples.test.json", json.dumps([
        {"url": "http://www.freebase.com/view/en/jamaica", "targetValue": '(list (description "Jamaican English") '
         '(description "Jamaican Creole English Language"))', "utterance": "what does jamaican people speak?"},
        {"url": "http://www.freebase.com/view/en/x", "targetValue": "(list (description Canada))",
         "utterance": "where is x?"}]))
    t = load_task(webq)
    assert t.format == "webquestions"
    assert t.questions[0].answers == ("Jamaican English", "Jamaican Creole English Language")
    assert t.questions[1].answers == ("Canada",)
    marco = _write(tmp_path / "dev_v2.1.json", json.dumps({
        "query": {"0": "what is a corporation?", "1": "nothing here"},
        "query_id": {"0": 1102432, "1": 7},
        "answers": {"0": ["A corporation is a company."], "1": ["No Answer Present."]},
        "wellFormedAnswers": {"0": "[]", "1": "[]"}}))
    t = load_task(marco, skip_bad=True)
    assert (t.format, t.kind, [q.id for q in t.questions]) == ("msmarco", "free", ["1102432"])
    assert "record 2: no gold answer" in t.skipped[0]


def test_fever_and_jeopardy(tmp_path):
    fever = _write(tmp_path / "shared_task_dev.jsonl",
                   json.dumps({"id": 1, "claim": "Nikolaj Coster-Waldau worked with Fox.", "label": "SUPPORTS"}) + "\n")
    t = load_task(fever)
    assert (t.format, t.kind, t.questions[0].answers) == ("fever", "label", ("SUPPORTS",))
    _write(tmp_path / "test.source", "The Divine Comedy\nHemingway\n")
    _write(tmp_path / "test.target", "This epic poem by Dante is divided into 3 parts\nHe wrote The Sun Also Rises\n")
    t = load_task(tmp_path / "test.source")
    assert (t.format, t.kind, t.questions[1].question) == ("jeopardy", "free", "Hemingway")
    _write(tmp_path / "bad.source", "a\nb\n")
    _write(tmp_path / "bad.target", "only one\n")
    with pytest.raises(RaglineError, match="has 2 lines but bad.target has 1"):
        load_task(tmp_path / "bad.source")


def test_a_malformed_line_is_reported_with_its_number_and_skipped_only_on_request(tmp_path):
    p = _write(tmp_path / "qs.jsonl", '{"question": "a?", "answers": ["x"]}\n{"question": "b?", "answers": \n'
               '{"question": "c?"}\n{"question": "d?", "answers": ["y"]}\n')
    with pytest.raises(RaglineError, match=r"qs.jsonl:2: not valid JSON.*--skip-bad"):
        load_task(p)
    t = load_task(p, skip_bad=True)
    assert [q.question for q in t.questions] == ["a?", "d?"]
    assert [s.rsplit("qs.jsonl:", 1)[1][:1] for s in t.skipped] == ["2", "3"]
    assert "no gold answer" in t.skipped[1]
    with pytest.raises(RaglineError, match="cannot tell the format"):
        load_task(_write(tmp_path / "x.yaml", "a: b\n"))
    with pytest.raises(RaglineError, match="unknown task format"):
        load_task(p, fmt="squad")


def test_kilt_scoring_counts_an_answer_only_with_full_provenance():
    qs = [Question("1", "q1", ("Voltaire",), ("Candide", "Voltaire"),
                   ((Page(title="Candide"),), (Page(title="Voltaire"), Page(title="Candide")))),
          titled("2", "q2", ("Paris",), ("Paris",)),
          titled("3", "q3", ("Rome",), ("Rome",))]

    def pred(answer, *titles):
        return {"output": [{"answer": answer, "provenance": [{"title": t} for t in titles]}]}

    # q1: top-1 page is a full gold set (R = 1) -> R-precision 1; q2: right answer, wrong page first -> 0;
    # q3: wrong answer, right page. Missing predictions would score 0 and still count.
    preds = {"1": pred("Voltaire", "Candide", "Paris"), "2": pred("Paris", "France", "Paris"),
             "3": pred("Milan", "Rome")}
    m = score_run(qs, "qa", preds, ks=(1, 2))
    assert m["em"] == pytest.approx(2 / 3)
    assert m["r_precision"] == pytest.approx(2 / 3)
    assert m["kilt_em"] == pytest.approx(1 / 3)
    assert m["recall@1"] == pytest.approx((0.5 + 0 + 1) / 3)  # q1: 1 of its 2 gold pages in the top 1
    assert m["recall@2"] == pytest.approx((0.5 + 1 + 1) / 3)
    pages = [Page(title=t) for t in ("A", "A", "C", "B")]  # distinct pages in rank order: A, C, B
    assert retrieval_metrics(pages, [(Page(title="B"), Page(title="A"))], [2])["r_precision"] == 0.5
    empty = score_run(qs, "qa", {"1": pred("  ", "Candide")})
    assert (empty["em"], empty["answered"], empty["questions"]) == (0.0, 1.0, 3.0)
