import json

import pytest

from ragline.errors import RaglineError
from ragline.evaluate.datasets import load_fanoutqa, load_questions
from ragline.evaluate.retrieval import mean_metrics, question_metrics


def test_page_metrics_by_hand():
    ranked = ["A", "B", "A", "C", "D"]  # titles of the ranked passages
    m = question_metrics(ranked, ["C", "A"], ks=[1, 2, 4])
    assert m["recall@1"] == 0.5 and m["precision@1"] == 1.0
    assert m["recall@2"] == 0.5 and m["precision@2"] == 0.5
    assert m["recall@4"] == 1.0 and m["precision@4"] == 2 / 3
    assert m["r_precision"] == 0.5  # distinct pages A, B, C, D: top-2 = A, B
    assert mean_metrics([{"x": 1.0}, {"x": 0.0}]) == {"x": 0.5}
    with pytest.raises(ValueError):
        question_metrics(ranked, [], [1])


def test_fanoutqa_dev_split_only_has_ids_0_to_7():
    dev = load_fanoutqa("dev")
    held = load_fanoutqa("heldout")
    assert dev and held
    assert {q.meta["parent"][0] for q in dev} <= set("01234567")
    assert {q.meta["parent"][0] for q in held} <= set("89abcdef")
    assert not {q.id for q in dev} & {q.id for q in held}
    assert not {q.question.lower() for q in dev} & {q.question.lower() for q in held}
    assert len({q.id for q in dev}) == len(dev)
    q = next(q for q in dev if q.question == "What is the batting hand of Pat Burrell?")
    assert q.answers == ("Right",) and q.gold_titles == ("Pat Burrell",)


def test_fanoutqa_filtered_to_corpus_titles():
    from ragline.corpus.readers import read_corpus

    titles = {d.title for d in read_corpus("wiki-leads")}
    dev = load_fanoutqa("dev", titles)
    # dev sub-questions whose evidence page is a bundled lead, each once, none shared with the held-out half
    assert len(dev) == 227
    assert all(q.gold_titles[0] in titles for q in dev)


def test_question_files_jsonl_and_kilt(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "Who?", "answers": ["Ann", 3], "gold_titles": ["Ann"]}) + "\n\n"
                 + json.dumps({"id": "k1", "input": "Where?", "output": [
                     {"answer": "Rome", "provenance": [{"title": "Rome"}, {"title": "Italy"}]},
                     {"answer": "Roma", "provenance": [{"title": "Rome"}]}]}) + "\n")
    a, b = load_questions(f)
    assert (a.id, a.question, a.answers, a.gold_titles) == ("line-1", "Who?", ("Ann", "3"), ("Ann",))
    assert (b.id, b.answers, b.gold_titles) == ("k1", ("Rome", "Roma"), ("Rome", "Italy"))
    f.write_text('{"question": ""}\n')
    with pytest.raises(RaglineError, match="q.jsonl:1"):
        load_questions(f)


def test_answerable_keeps_questions_whose_answer_is_in_their_gold_page():
    from ragline.evaluate.datasets import Question, answerable

    pages = {"Turkey": ["Turkey's capital is Ankara.", "Istanbul is its largest city."], "Italy": ["Rome, Italy."]}
    qs = [Question("1", "Capital of Turkey?", ("Ankara",), ("Turkey",)),
          Question("2", "Largest city of Turkey?", ("The Istanbul",), ("Turkey",)),  # normalised: article dropped
          Question("3", "Capital of Italy?", ("Rome",), ("Turkey",)),                # answer in another page only
          Question("4", "Area of Italy?", ("301,340 km2",), ("Italy",))]
    assert [q.id for q in answerable(qs, pages)] == ["1", "2"]


def test_bundled_answerable_task_is_a_subset(small_index):
    from ragline.evaluate.harness import EvalConfig, load_eval_task
    from ragline.index.directory import IndexDir

    ix = IndexDir.open(small_index)
    every = load_eval_task(EvalConfig(task="fanoutqa-dev"), lambda: ix).questions
    some = load_eval_task(EvalConfig(task="fanoutqa-dev-answerable"), lambda: ix).questions
    assert set(q.id for q in some) <= set(q.id for q in every) and len(some) < len(every)
