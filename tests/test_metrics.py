import pytest

from ragline.evaluate.metrics import exact_match, normalise, token_f1


@pytest.mark.parametrize("raw, norm", [("The Eiffel Tower!", "eiffel tower"), ("  A  cat, an apple ", "cat apple"),
                                       ("Theatre", "theatre"), ("U.S.A.", "usa"), ("", "")])
def test_normalise(raw, norm):
    assert normalise(raw) == norm


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_f1_by_hand():
    # pred tokens: stanley kubrick directed; gold: stanley kubrick -> P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("Stanley Kubrick directed", ["Stanley Kubrick"]) == pytest.approx(0.8)
    assert token_f1("Kubrick", ["Stanley Kubrick", "Kubrick"]) == 1.0
    assert token_f1("Paris", ["London"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalisation
    assert token_f1("new new york", ["new york"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
