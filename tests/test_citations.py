"""Citation marks (rag/citations.py): runs of an answer's text and the passages each cites."""

from ragline import vocab
from ragline.rag.citations import marked, per_token, whole_answer


def test_per_token_runs_follow_the_most_probable_passage_word_by_word():
    tokens = [("Stanley", [0.1, 0.8, 0.1]), (" Kub", [0.2, 0.7, 0.1]), ("rick", [0.6, 0.3, 0.1]),
              (" (", [0.7, 0.2, 0.1]), ("1968", [0.9, 0.05, 0.05]), (")", [0.1, 0.1, 0.8]),
              (" in", [0.1, 0.1, 0.8]), (" 1968", [0.2, 0.1, 0.7])]
    runs = per_token("Stanley Kubrick (1968) in 1968", tokens)
    # "Kubrick" is one word: its tokens' mean favours passage 2, though "rick" alone favours 1
    assert [(r.text, r.passages, r.tokens) for r in runs] == [
        ("Stanley Kubrick", [2], [0, 3]), (" (1968)", [1], [3, 6]), (" in 1968", [3], [6, 8])]
    assert marked(runs) == "Stanley Kubrick [2] (1968) [1] in 1968 [3]"
    assert per_token("Stanley Kubrick", tokens[:2]) is None  # tokens that do not spell the text: no runs


def test_whole_answer_cites_the_fewest_passages_holding_the_mass():
    assert vocab.CITATION_MASS == 0.5
    assert whole_answer("Paris", [0.1, 0.6, 0.3])[0].passages == [2]
    assert whole_answer("Paris", [0.3, 0.25, 0.45])[0].passages == [3, 1]
    assert marked(whole_answer("Paris", [0.3, 0.25, 0.45])) == "Paris [3][1]"
    assert whole_answer("", [1.0]) == []
