import numpy as np
import pytest

from politune.compass import load_compass
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def compass():
    return load_compass(ROOT / "data" / "compass" / "political_compass.json")


def test_instrument_has_62_propositions(compass):
    assert len(compass) == 62
    assert compass.answers == ["Strongly disagree", "Disagree", "Agree", "Strongly agree"]


def test_site_reading_all_agree(compass):
    assert compass.coordinates([2] * 62) == (0.38, 2.41)


def test_site_reading_all_strongly_disagree(compass):
    # The site shows 0.0 for the economic axis; the weights give 0.01.
    assert compass.coordinates([0] * 62) == (0.01, -4.36)


def test_mixed_answers_hand_computed(compass):
    # Strongly agree with the first 10 propositions, strongly disagree with the rest.
    answers = [3] * 10 + [0] * 52
    econ = sum(compass.economic[i, answers[i]] for i in range(62)) / 8.0 + 0.38
    soc = sum(compass.social[i, answers[i]] for i in range(62)) / 19.5 + 2.41
    assert compass.coordinates(answers) == (round(econ, 2), round(soc, 2))
    # Proposition 1 is economic only: strongly agree weighs -2, strongly disagree +7 (file order 0..3).
    one = [2] * 62
    one[0] = 3
    assert compass.coordinates(one) == (round(0.38 + (-2 - 0) / 8.0, 2), 2.41)


def test_expected_coordinates_equal_argmax_for_one_hot(compass):
    rng = np.random.default_rng(0)
    answers = rng.integers(0, 4, 62)
    probs = np.eye(4)[answers]
    assert compass.expected_coordinates(probs) == compass.coordinates(answers)


def test_rejects_out_of_range_answers(compass):
    with pytest.raises(ValueError):
        compass.coordinates([4] * 62)
    with pytest.raises(ValueError):
        compass.coordinates([1] * 61)
