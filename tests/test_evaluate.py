import json

import pytest

from ragline.errors import RaglineError
from ragline.evaluate.scoring import retrieval_metrics
from ragline.questions import Page, load_fanoutqa, load_task


def test_page_metrics_by_hand():
    ranked = [Page(title=t) for t in ["A", "B", "A", "C", "D"]]  # titles of the ranked passages
    # one evidence set {C, A}; distinct pages A, B, C, D. KILT's rank: A puts the set's point down, B is False,
    # C completes the set, whose point leaves A's place and is appended as True: [False, True, False]
    m = retrieval_metrics(ranked, [(Page(title="C"), Page(title="A"))], ks=[1, 2, 3, 4])
    assert m["r_precision"] == 0.5  # top-2 pages A, B hold one of the two gold pages
    assert (m["recall@1"], m["recall@2"], m["recall@3"]) == (0.0, 1.0, 1.0)
    assert m["precision@3"] == 1 / 3 and m["precision@4"] == 1 / 4 and m["success_rate@3"] == 1.0
    # two evidence sets {C} and {A}: each page is a set of its own
    m = retrieval_metrics(ranked, [(Page(title="C"),), (Page(title="A"),)], ks=[1, 3])
    assert (m["recall@1"], m["recall@3"], m["precision@3"], m["r_precision"]) == (0.5, 1.0, 2 / 3, 1.0)
    assert retrieval_metrics(ranked, [], ks=[1]) == {"r_precision": 0.0, "precision@1": 0.0, "recall@1": 0.0,
                                                     "success_rate@1": 0.0}


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
    f.write_text(json.dumps({"question": "Who?", "answers": ["Ann", 3, " "], "gold_titles": ["Ann", "Ann"]}) + "\n\n"
                 + json.dumps({"question": "Where?", "positive": "Rome"}) + "\n")
    a, b = load_task(f, require_answers=False).questions
    assert (a.id, a.question, a.answers, a.gold_titles) == ("line-1", "Who?", ("Ann", "3"), ("Ann",))
    assert a.provenance == ((Page(title="Ann"),),)  # a duplicate gold title is one page, not two
    assert (b.answers, b.gold_titles) == ((), ("Rome",))
    k = tmp_path / "k.jsonl"
    k.write_text(json.dumps({"id": "k1", "input": "Where?", "output": [
        {"answer": "Rome", "provenance": [{"title": "Rome"}, {"title": "Italy"}]},
        {"answer": "Roma", "provenance": [{"title": "Rome"}]}, {"answer": "  "}]}) + "\n")
    (c,) = load_task(k).questions
    assert (c.id, c.answers, c.gold_titles) == ("k1", ("Rome", "Roma"), ("Rome", "Italy"))  # blank answer dropped
    f.write_text('{"question": ""}\n')
    with pytest.raises(RaglineError, match="q.jsonl:1"):
        load_task(f)
    f.write_text('{"question": "Who?", "answers": ["x"]}\n')
    with pytest.raises(RaglineError, match="q.jsonl:1: no gold page"):
        load_task(f, require_pages=True)


def test_answerable_keeps_questions_whose_answer_is_in_their_gold_page():
    from ragline.questions import answerable, titled

    pages = {"Turkey": ["Turkey's capital is Ankara.", "Istanbul is its largest city."], "Italy": ["Rome, Italy."]}
    qs = [titled("1", "Capital of Turkey?", ("Ankara",), ("Turkey",)),
          titled("2", "Largest city of Turkey?", ("The Istanbul",), ("Turkey",)),  # normalised: article dropped
          titled("3", "Capital of Italy?", ("Rome",), ("Turkey",)),                # answer in another page only
          titled("4", "Area of Italy?", ("301,340 km2",), ("Italy",))]
    assert [q.id for q in answerable(qs, pages)] == ["1", "2"]


def test_bundled_answerable_task_is_a_subset(small_index):
    from ragline.evaluate.answers import EvalConfig, load_eval_task
    from ragline.index.directory import IndexDir

    ix = IndexDir.open(small_index)
    every = load_eval_task(EvalConfig(task="fanoutqa-dev"), lambda: ix).questions
    some = load_eval_task(EvalConfig(task="fanoutqa-dev-answerable"), lambda: ix).questions
    assert set(q.id for q in some) <= set(q.id for q in every) and len(some) < len(every)
