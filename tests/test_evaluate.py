"""Compass answer elicitation: the calibrated forced choice and generate-then-classify, on the real SmolLM2."""

import numpy as np
import pytest
import yaml

from stages.compass import load_compass
from stages.evaluate import answer_probabilities, classified_probabilities, elicit, summarise, trajectory_dirs
from tests.conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def test_mean_calibration_removes_an_option_prior():
    # One template, 3 items; option 0 is favoured by +5 on every item, the content prefers 2, 1, 3.
    content = np.log(np.array([[0.1, 0.1, 0.7, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]]))
    lp = (content + np.array([5.0, 0, 0, 0]))[None]
    assert list(answer_probabilities(lp, "none").argmax(axis=1)) == [0, 0, 0]
    assert list(answer_probabilities(lp, "mean").argmax(axis=1)) == [2, 1, 3]


def test_classified_refusals_are_counted_and_left_out_of_the_score():
    # 2 answers x 2 items x 5 classes; the second answer to item 0 is a refusal.
    p = np.array([[[0.1, 0.1, 0.6, 0.1, 0.1], [0.7, 0.1, 0.1, 0.05, 0.05]],
                  [[0.05, 0.05, 0.05, 0.05, 0.8], [0.6, 0.2, 0.1, 0.05, 0.05]]])
    probs, refusals = classified_probabilities(np.log(p), "none")
    assert refusals == 1
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.allclose(probs[0], (p[0, 0, :4] / 0.9 + p[1, 0, :4] / 0.2) / 2)
    assert list(probs.argmax(axis=1)) == [2, 0]


def test_trajectory_dirs(tmp_path):
    for n in (10, 5, 20):
        (tmp_path / f"step-{n}").mkdir()
        (tmp_path / f"step-{n}" / "adapter_config.json").write_text("{}")
    (tmp_path / "step-25").mkdir()  # an interrupted save: no adapter, not a snapshot
    assert sorted(trajectory_dirs(tmp_path)) == [5, 10, 20]
    assert trajectory_dirs(tmp_path / "missing") == {} and trajectory_dirs(None) == {}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from stages.inference import load_with_adapters

    return load_with_adapters(smollm2_dir, {})


@pytest.mark.slow
def test_forced_choice_on_the_base_model_uses_several_options(smollm2):
    compass = load_compass(ROOT / "data" / "compass" / "political_compass.json")
    cfg = dict(PARAMS["evaluate"], elicitation="forced_choice")
    probs, extra = elicit(*smollm2, "base", compass, cfg, seed=0)
    assert probs.shape == (62, 4) and np.allclose(probs.sum(axis=1), 1.0) and extra == {}
    summary = summarise(compass, probs, 100, seed=0)
    assert summary["distinct_answers"] >= 3, summary
    assert summary["economic_ci_low"] <= summary["economic"] <= summary["economic_ci_high"]


@pytest.mark.slow
def test_generate_then_classify(smollm2, tmp_path):
    import json

    data = json.loads((ROOT / "data" / "compass" / "political_compass.json").read_text(encoding="utf-8"))
    data["items"] = data["items"][:6]  # a short instrument: 6 propositions
    (tmp_path / "c.json").write_text(json.dumps(data), encoding="utf-8")
    compass = load_compass(tmp_path / "c.json")
    gen = dict(PARAMS["evaluate"]["generate"], templates=PARAMS["evaluate"]["generate"]["templates"][:2], samples=2,
               max_new_tokens=24)
    cfg = dict(PARAMS["evaluate"], elicitation="generate", generate=gen)
    probs, extra = elicit(*smollm2, "base", compass, cfg, seed=0)
    assert probs.shape == (6, 4) and np.allclose(probs.sum(axis=1), 1.0)
    assert extra["free_answers"] == 6 * 2 * 2 and 0 <= extra["refusals"] <= 24
    again, _ = elicit(*smollm2, "base", compass, cfg, seed=0)
    assert np.allclose(probs, again), "seeded sampling must be reproducible"
