import pytest

from ragline.evaluate.metrics import accuracy, bleu1, exact_match, normalise, regex_match, rouge_l, token_f1


@pytest.mark.parametrize("raw, norm", [("The Eiffel Tower!", "eiffel tower"), ("  A  cat, an apple ", "cat apple"),
                                       ("Theatre", "theatre"), ("U.S.A.", "usa"), ("", ""),
                                       ("Anne of the Island", "anne of island"), ("rock-'n'-roll", "rocknroll")])
def test_normalise(raw, norm):
    assert normalise(raw) == norm


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_accuracy_is_strict_string_equality():
    assert accuracy(" SUPPORTS ", ["SUPPORTS"]) == 1.0  # stripped, as KILT does
    assert accuracy("supports", ["SUPPORTS"]) == 0.0    # but not normalised
    assert accuracy("The Beatles", ["Beatles"]) == 0.0


def test_f1_by_hand():
    # pred tokens: stanley kubrick directed; gold: stanley kubrick -> P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("Stanley Kubrick directed", ["Stanley Kubrick"]) == pytest.approx(0.8)
    assert token_f1("Kubrick", ["Stanley Kubrick", "Kubrick"]) == 1.0
    assert token_f1("Paris", ["London"]) == 0.0
    assert token_f1("the", ["a"]) == 0.0  # KILT: nothing shared (both empty after normalisation) scores 0
    assert token_f1("new new york", ["new york"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_rouge_l_by_hand():
    # distinct words: pred {the, cat, sat, on, mat}, gold {the, cat, was, on, mat}; LCS words {the, cat, on, mat}
    assert rouge_l("the cat sat on the mat", ["the cat was on the mat"]) == pytest.approx(0.8, abs=1e-6)
    # LCS of "a b c d" and "b d e" is "b d": P = 2/4, R = 2/3 -> F = 4/7
    assert rouge_l("a b c d", ["b d e"]) == pytest.approx(4 / 7, abs=1e-6)
    assert rouge_l("a b c d", ["x", "b d e"]) == pytest.approx(4 / 7, abs=1e-6)  # best gold
    assert rouge_l("", ["anything"]) == 0.0
    assert rouge_l("Paris", ["paris"]) == 0.0  # raw strings, case-sensitive, as KILT calls it


def test_bleu1_by_hand():
    # after normalisation pred = cat cat (c = 2), ref = cat sat (r = 2): clipped 1 of 2, no brevity penalty
    assert bleu1("the cat the cat", ["the cat sat"]) == pytest.approx(0.5)
    # pred = paris (c = 1), closest ref length r = 3: precision 1, BP = exp(1 - 3) = e^-2
    assert bleu1("Paris", ["paris is capital"]) == pytest.approx(2.718281828 ** -2)
    # several references: counts clip at the most in any one reference; r = the closest length (2)
    assert bleu1("york york new", ["new york", "york york city hall"]) == pytest.approx(1.0)
    assert bleu1("", ["x"]) == 0.0


def test_regex_match_for_curatedtrec_patterns():
    assert regex_match("Ankara, Turkey", [r"ankara"]) == 1.0  # case-insensitive, anchored at the start
    assert regex_match("the city of Ankara", [r"ankara"]) == 0.0
    assert regex_match("1969", [r"19(69|70)"]) == 1.0
    assert regex_match("Lincoln", [r"(unclosed", r"(Abraham )?Lincoln"]) == 1.0  # a broken pattern is skipped
    assert regex_match("x", []) == 0.0
