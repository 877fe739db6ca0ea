"""``ragline score`` against KILT's official scoring scripts (kilt/eval_downstream.py, kilt/eval_retrieval.py).

Each expected number below is worked out by hand from the scripts' published definitions: answers stripped
and blank gold answers dropped; EM / F1 on normalised text, accuracy on the raw stripped strings; every mean
over all gold questions (an empty answer and a question without provenance score 0 and still count);
R-precision as the best of the gold evidence sets; recall@k and precision@k over KILT's evidence-set rank;
KILT-<metric> counted only where R-precision is 1. Pages are matched by wikipedia_id where gold and guess both
carry ids (a right title under a wrong id is wrong), by title where the guess has no ids.
"""

import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from ragline.errors import RaglineError
from ragline.evaluate.scoring import evidence_rank, score_files


def _gold(qid, question, *outputs):
    return {"id": qid, "input": question, "output": list(outputs)}


def _out(answer=None, *pages):
    out = {} if answer is None else {"answer": answer}
    if pages:
        out["provenance"] = [dict(p) for p in pages]
    return out


def _guess(qid, answer, *pages):
    return {"id": qid, "output": [{"answer": answer, "provenance": [dict(p) for p in pages]}]}


CANDIDE = {"wikipedia_id": "100", "title": "Candide"}
VOLTAIRE = {"wikipedia_id": "200", "title": "Voltaire"}
PARIS = {"wikipedia_id": "300", "title": "Paris"}
APOLLO = {"wikipedia_id": "400", "title": "Apollo 11"}

GOLD = [
    # two gold answers and two evidence sets ({Candide} and {Voltaire, Candide})
    _gold("1", "Who wrote Candide?", _out("Voltaire", CANDIDE), _out("François-Marie Arouet", VOLTAIRE, CANDIDE)),
    # a blank gold answer is dropped, not matched by an empty guess
    _gold("2", "Capital of France?", _out("Paris", PARIS), _out("  ")),
    # no provenance at all: retrieval and KILT scores 0 (and still in the denominators)
    _gold("3", "Colour of the sky?", _out("blue")),
    _gold("4", "Year of the first Moon landing?", _out("1969", APOLLO)),
]
GUESS = [
    # EM after normalisation but not accuracy; the first page has the right id under a wrong title
    _guess("1", "voltaire.", {"wikipedia_id": "100", "title": "Wrong title"}, VOLTAIRE),
    # exact answer, provenance by title only: matched by title
    _guess("2", "Paris", {"title": "Paris"}),
    # an empty answer scores 0 on every answer metric
    _guess("3", "", {"wikipedia_id": "9", "title": "Sky"}),
    # right answer, right title, wrong id: R-precision 0, so KILT-EM 0
    _guess("4", "1969", {"wikipedia_id": "999", "title": "Apollo 11"}),
    _guess("5", "ignored", PARIS),  # an id not in the gold file is ignored
]


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "gold.jsonl", GOLD), write_jsonl(tmp_path / "guess.jsonl", GUESS)


def test_scores_equal_the_official_definitions(files):
    gold, guess = files
    r = score_files(gold, guess, ks=[1, 5])
    m = r["metrics"]
    assert (r["kind"], r["ignored_predictions"], m["questions"]) == ("qa", 1, 4.0)
    expect = {
        "accuracy": (0 + 1 + 0 + 1) / 4,       # "voltaire." is not a gold string character for character
        "em": (1 + 1 + 0 + 1) / 4,
        "f1": (1 + 1 + 0 + 1) / 4,
        "r_precision": (1 + 1 + 0 + 0) / 4,    # q1 by id (title ignored), q2 by title, q4's id is wrong
        "kilt_em": (1 + 1 + 0 + 0) / 4,        # over all 4 questions, not over those with provenance
        "kilt_accuracy": (0 + 1 + 0 + 0) / 4,
        "kilt_f1": (1 + 1 + 0 + 0) / 4,
        # q1 rank [True (completes {100}), True (completes {200, 100})] over 2 sets; q2 [True] over 1 set
        "recall@1": (1 / 2 + 1 + 0 + 0) / 4, "recall@5": (1 + 1 + 0 + 0) / 4,
        "precision@1": (1 + 1 + 0 + 0) / 4, "precision@5": (2 / 5 + 1 / 5 + 0 + 0) / 4,
        "success_rate@5": (1 + 1 + 0 + 0) / 4,
    }
    for name, value in expect.items():
        assert m[name] == pytest.approx(value), name


def test_kilt_evidence_rank_by_hand():
    # a page of two sets advances both; a set's point moves to the page that completes it
    rank, n = evidence_rank(["A", "X", "B", "C"], [["A"], ["A", "B"], ["C", "D"], ["A"]])
    assert n == 3  # {A} appears twice: one distinct set
    assert rank == [True, False, True, "evidence_set:2"]  # A: {A} done, {A, B} waits; B completes it
    assert evidence_rank([], [["A"]]) == ([], 0)  # no guess page: no set counted, every metric 0


def test_fever_labels_and_free_form_rouge(tmp_path):
    gold = write_jsonl(tmp_path / "fever-dev-kilt.jsonl", [
        _gold("f1", "Paris is in Italy.", _out("REFUTES")), _gold("f2", "Rome is in Italy.", _out("SUPPORTS"))])
    guess = write_jsonl(tmp_path / "g.jsonl", [_guess("f1", "REFUTES"), _guess("f2", "supports")])
    r = score_files(gold, guess)
    assert r["kind"] == "label"
    assert r["metrics"]["accuracy"] == 0.5 and r["metrics"]["em"] == 1.0  # accuracy is strict, EM normalises
    assert "r_precision" not in r["metrics"]  # a task without provenance has no retrieval scores
    eli5 = write_jsonl(tmp_path / "eli5.jsonl", [_gold("e", "Why?", _out("the cat is on the mat"),
                                                        _out("a dog barked loudly"))])
    guess = write_jsonl(tmp_path / "g2.jsonl", [_guess("e", "the cat sat on the mat")])
    # the rouge package's ROUGE-L (as KILT calls it): 4 of the 5 distinct words of each side form the common
    # subsequence (the, cat, on, mat), P = R = 0.8; the best gold answer counts
    assert score_files(eli5, guess)["metrics"]["rouge_l"] == pytest.approx(0.8, abs=1e-6)


def test_refusals_where_the_official_script_asserts(tmp_path, files):
    gold, guess = files
    dup = write_jsonl(tmp_path / "dup.jsonl", [*GUESS, _guess("2", "Lyon")])
    with pytest.raises(RaglineError, match="prediction id '2' appears twice"):
        score_files(gold, dup)
    missing = write_jsonl(tmp_path / "missing.jsonl", GUESS[:3])
    with pytest.raises(RaglineError, match="1 gold ids have no prediction"):
        score_files(gold, missing)
    two = write_jsonl(tmp_path / "two.jsonl", [*GUESS[:3], {"id": "4", "output": [{"answer": "a"}, {"answer": "b"}]}])
    with pytest.raises(RaglineError, match="exactly one output"):
        score_files(gold, two)
    dup_gold = write_jsonl(tmp_path / "dup-gold.jsonl", [*GOLD, GOLD[0]])
    with pytest.raises(RaglineError, match="id '1' appears twice"):
        score_files(dup_gold, guess)
    no_answer = write_jsonl(tmp_path / "no-answer.jsonl", [_gold("1", "Who?", _out(None, CANDIDE))])
    with pytest.raises(RaglineError, match="has no answer"):
        score_files(no_answer, guess)


def test_cli_score_prints_json(files):
    gold, guess = files
    r = subprocess.run([sys.executable, "-m", "ragline", "score", "--gold", str(gold), "--guess", str(guess),
                        "-k", "1", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["metrics"]
    assert m["kilt_em"] == 0.5 and m["recall@1"] == pytest.approx(0.375)
    r = subprocess.run([sys.executable, "-m", "ragline", "score", "--gold", str(gold), "--guess", "nope.jsonl"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "prediction file nope.jsonl does not exist" in r.stderr
