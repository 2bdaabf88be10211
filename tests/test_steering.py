"""Steering measured where it happens: mirror pairs, the balanced compass, the side-preference instrument."""

from __future__ import annotations

import json

import numpy as np
import pytest

from politune import side_preference
from politune.build_datasets import build, collect
from politune.common import ParamsError
from politune.compass import agreement_bias, balanced, load_compass, load_twins
from tests.helpers import PARAMS, ROOT, section, typed

COMPASS = ROOT / "data" / "compass" / "political_compass.json"
TWINS = ROOT / "data" / "compass" / "reversed.json"


# --- the balanced compass -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compass():
    return load_compass(COMPASS)


def test_twins_pair_with_the_originals_and_reverse_their_weights(compass):
    twins = load_twins(TWINS, compass)
    assert len(twins) == 62 and len(set(twins.statements)) == 62
    assert not set(twins.statements) & set(compass.statements)
    # strongly agreeing with a twin scores as strongly disagreeing with its original
    assert twins.coordinates(np.full(62, 3)) == compass.coordinates(np.full(62, 0))
    data = json.loads(TWINS.read_text(encoding="utf-8"))
    assert [it["original"] for it in data["items"]] == compass.statements


def test_twins_file_that_does_not_match_the_compass_is_refused(compass, tmp_path):
    from politune.common import InputError

    data = json.loads(TWINS.read_text(encoding="utf-8"))
    data["items"] = data["items"][:61]
    (tmp_path / "t.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError, match="one twin per proposition"):
        load_twins(tmp_path / "t.json", compass)
    data = json.loads(TWINS.read_text(encoding="utf-8"))
    data["items"][4]["original"] = "something else"
    (tmp_path / "t.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError, match=r"items\[4\]: field 'original'"):
        load_twins(tmp_path / "t.json", compass)


def test_balanced_compass_cancels_acquiescence_and_keeps_a_consistent_position(compass):
    twins = load_twins(TWINS, compass)
    both = balanced(compass, twins)
    one_hot = np.eye(4)
    # A consistent model: a position on the originals and the mirror answer on the twins.
    answers = compass.economic.argmax(axis=1)  # the most right-wing answer to every proposition
    consistent = np.concatenate([answers, 3 - answers])
    assert both.coordinates(consistent) == pytest.approx(compass.coordinates(answers), abs=0.011)
    assert agreement_bias(one_hot[answers], one_hot[3 - answers]) == pytest.approx(0.0)
    # A yes-sayer: "agree" to everything reads as a position on the originals alone (the site's reading
    # 0.38, 2.41), but on the balanced compass its originals and twins cancel to the midpoint of the scale.
    agree = np.full(124, 2)
    assert compass.coordinates(agree[:62]) == (0.38, 2.41)
    # the midpoint of agreeing and disagreeing with every original (a twin's "agree" weighs as its original's
    # "disagree"), not the consistent "agree" reading (agree with the originals, disagree with the twins)
    midpoint = np.mean([compass.coordinates(np.full(62, 2)), compass.coordinates(np.full(62, 1))], axis=0)
    assert both.coordinates(agree) == pytest.approx(tuple(midpoint), abs=0.011)
    consistent_agree = both.coordinates(np.concatenate([np.full(62, 2), np.full(62, 1)]))
    assert consistent_agree == pytest.approx((0.38, 2.41), abs=0.011)
    assert abs(both.coordinates(agree)[1] - consistent_agree[1]) > 1
    assert agreement_bias(one_hot[np.full(62, 3)], one_hot[np.full(62, 3)]) == pytest.approx(1.0)
    assert agreement_bias(one_hot[np.full(62, 0)], one_hot[np.full(62, 0)]) == pytest.approx(-1.0)


# --- mirror pairs ---------------------------------------------------------------------------------------------

def _write(path, side: str, n: int, start: int = 0):
    other = "left" if side == "right" else "right"
    rows = [{"prompt": f"Question {side} {i}?", "chosen": f"A {side} answer {i}.", "rejected": f"A {other} answer {i}."}
            for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(source, side, mirror=None, mirror_side=None, fraction=1.0):
    return section("datasets", source=str(source), source_side=side,
                   mirror={"source": str(mirror) if mirror else None, "side": mirror_side, "fraction": fraction})


@pytest.fixture
def external(tmp_path):
    ext = tmp_path / "external"
    ext.mkdir()
    return _write(ext / "right.jsonl", "right", 10), _write(ext / "left.jsonl", "left", 10), ext


def test_mirror_pairs_swap_the_other_sides_answers_and_mark_sides(external, tmp_path):
    right, left, ext = external
    pairs, drawn = collect(_cfg(right, "right", left, "left"), 0, tmp_path / "none.parquet", ext, "right")
    assert drawn == {str(right): 10, f"mirror:{left}": 10}
    plain = [p for p in pairs if p["origin"] == "right"]
    mirror = [p for p in pairs if p["origin"] == "left"]
    assert len(plain) == len(mirror) == 10
    assert all(p["side"] == "right" for p in pairs), "every chosen answer voices the right"
    assert all(p["chosen"][0]["content"].startswith("A right answer") for p in pairs)
    assert all(p["rejected"][0]["content"].startswith("A left answer") for p in pairs)


def test_mirror_runs_of_both_sides_see_the_same_pairs_swapped(external, tmp_path):
    right, left, ext = external
    r, _ = collect(_cfg(right, "right", left, "left"), 0, tmp_path / "none.parquet", ext, "right")
    l, _ = collect(_cfg(left, "left", right, "right"), 0, tmp_path / "none.parquet", ext, "left")
    br, bl = build(r, 0, 0.2), build(l, 0, 0.2)
    for split in ("train", "test"):
        a, b = br["dpo"][split], bl["dpo"][split]
        assert a["id"] == b["id"], "the same pairs in the same split"
        assert a["chosen"] == b["rejected"] and a["rejected"] == b["chosen"]
        assert a["origin"] == b["origin"]
        assert set(a["side"]) == {"right"} and set(b["side"]) == {"left"}
    assert set(br["dpo"]["test"]["origin"]) <= {"right", "left"}


def test_mirror_fraction_and_plain_default(external, tmp_path):
    right, left, ext = external
    pairs, drawn = collect(_cfg(right, "right", left, "left", fraction=0.5), 0, tmp_path / "x", ext, "right")
    assert drawn[f"mirror:{left}"] == 5 and len(pairs) == 15
    pairs, drawn = collect(_cfg(right, None), 0, tmp_path / "x", ext, "right")
    assert len(pairs) == 10 and {p["side"] for p in pairs} == {""}, "an external source without a side: unknown"


@pytest.mark.parametrize("mirror, side, match", [
    ("right", "left", "is the plain source itself"),
    ("left", None, "say which side"),
    ("left", "right", "the ideology's own side"),
])
def test_mirror_params_errors_name_the_key(external, tmp_path, mirror, side, match):
    right, left, ext = external
    source = {"right": right, "left": left}[mirror]
    with pytest.raises(ParamsError, match=match):
        collect(_cfg(right, None, source, side), 0, tmp_path / "x", ext, "right")
    import pandas as pd

    table = pd.DataFrame({"id": ["a", "b"], "status": ["kept", "kept"], "side": ["right", "right"],
                          "instruction": ["q1?", "q2?"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"]})
    table.to_parquet(tmp_path / "annotated.parquet")
    with pytest.raises(ParamsError, match="the annotation has no 'left' pairs; set annotate.mirror: true"):
        collect(section("datasets", mirror={"source": "annotated", "side": None, "fraction": 1.0}),
                0, tmp_path / "annotated.parquet", ext, "right")


def test_params_schema_checks_the_new_keys():
    from politune.schema import validate_sections

    datasets = dict(PARAMS["datasets"], mirror={"source": None, "side": "centre", "fraction": 1.0})
    assert any(p.startswith("datasets.mirror.side") for p in validate_sections({"datasets": datasets}))
    evaluate = dict(PARAMS["evaluate"], side_preference=dict(PARAMS["evaluate"]["side_preference"],
                                                             heldout=[{"path": "x.jsonl"}]))
    assert any(p.startswith("evaluate.side_preference.heldout.0.side") for p in
               validate_sections({"evaluate": evaluate}))
    assert validate_sections({"datasets": PARAMS["datasets"], "evaluate": PARAMS["evaluate"]}) == []


# --- the side-preference instrument ---------------------------------------------------------------------------

def test_summary_of_known_differences():
    base = {"sum": np.zeros(6), "per_token": np.zeros(6)}
    d = {"sum": np.array([2.0, 3.0, 4.0, -1.0, -2.0, -3.0]), "per_token": np.array([0.1] * 3 + [-0.1] * 3)}
    sides = ["right"] * 3 + ["left"] * 3
    s = side_preference.summarise(d, base, sides, ["heldout"] * 6, 500, seed=0)["heldout"]
    assert s["right_data"]["shift"] == 3.0 and s["right_data"]["moved_right"] == 1.0
    assert 2.0 <= s["right_data"]["shift_ci_low"] <= 3.0 <= s["right_data"]["shift_ci_high"] <= 4.0
    assert s["left_data"]["shift"] == -2.0 and s["left_data"]["moved_left"] == 1.0
    assert s["left_data"]["shift_per_token"] == -0.1
    same = side_preference.summarise(base, base, sides, ["heldout"] * 6, 100, seed=0)["heldout"]
    assert all(v["shift"] == v["shift_ci_low"] == v["shift_ci_high"] == 0 for v in same.values())
    # two groups: each summarised on its own pairs alone
    groups = ["heldout", "test_split"] * 3
    both = side_preference.summarise(d, base, sides, groups, 100, seed=0)
    assert set(both) == {"heldout", "test_split"}
    assert both["heldout"]["right_data"]["pairs"] == 2 and both["heldout"]["right_data"]["shift"] == 3.0  # 2, 4
    assert both["test_split"]["right_data"]["pairs"] == 1 and both["test_split"]["right_data"]["shift"] == 3.0
    assert both["test_split"]["left_data"]["shift"] == -2.0 and both["heldout"]["left_data"]["pairs"] == 1


def test_pairs_from_the_test_split_and_heldout_files(tmp_path, external):
    right, left, ext = external
    pairs, _ = collect(_cfg(right, "right", left, "left"), 0, tmp_path / "x", ext, "right")
    built = build(pairs, 0, 0.3, section("datasets").stance.model_copy(update={"fraction": 1.0}))
    (tmp_path / "dpo").mkdir()
    built["dpo"]["test"].to_parquet(str(tmp_path / "dpo" / "test.parquet"))
    cfg = section("evaluate", side_preference=dict(PARAMS["evaluate"]["side_preference"],
                                                   heldout=[{"path": str(left), "side": "left"}], max_pairs=4))
    cfg = cfg.side_preference
    got, sources = side_preference.collect(tmp_path / "dpo", cfg)
    assert sources == {"test_split": 6, str(left): 4}, "stance pairs are format practice, left out"
    assert len(got) == 10
    for i in range(len(got)):  # the right-voiced answer, whichever of chosen/rejected it was
        assert got.right[i][0]["content"].startswith("A right answer")
        assert got.left[i][0]["content"].startswith("A left answer")
    assert got.data_side[-4:] == ["left"] * 4
    assert got.group == ["test_split"] * 6 + ["heldout"] * 4


TOPICS = ["taxes", "schools", "energy", "roads", "farms", "health care", "housing", "trade", "the police", "water",
          "jobs", "the border", "pensions", "banks", "prices", "the courts", "the army", "churches", "science",
          "small towns"]
RIGHT = "Cut government spending on {t} and let free markets and families decide; less regulation means more liberty."
LEFT = "Fund public programs for {t} and tax the rich; strong unions and fair rules protect working people."


def _pairs(topics, data_side):
    """Preference pairs on ``topics``: chosen voices ``data_side``."""
    rows = []
    for t in topics:
        right, left = RIGHT.format(t=t), LEFT.format(t=t)
        chosen, rejected = (right, left) if data_side == "right" else (left, right)
        rows.append({"prompt": f"What should we do about {t}?", "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def right_trained(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny random model, trained by the SFT stage's code on right-voiced answers."""
    from politune.build_datasets import normalise, save
    from politune.sft import train

    root = tmp_path_factory.mktemp("right-trained")
    pairs = normalise(_pairs(TOPICS[:12], "right"), "train")
    save(build(pairs, 0, 0.2)["sft"], root / "sft-data")
    params = typed(base={"seed": 0}, lora=dict(PARAMS["lora"], r=8),
                   sft=dict(PARAMS["sft"], max_steps=30, learning_rate=5e-3, save_steps=100, logging_steps=10,
                            warmup_steps=0))
    train(tiny_model_dir, root / "sft-data", root / "adapter", params, root / "work")
    return root / "adapter"


def test_instrument_shows_the_side_a_model_was_trained_for_and_zero_for_base(tiny_model_dir, right_trained,
                                                                                tmp_path):
    from politune.evaluate import side_summary
    from politune.inference import load_with_adapters

    held = {side: tmp_path / f"{side}.jsonl" for side in ("right", "left")}
    for side, path in held.items():  # unseen topics, both data sides
        path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(TOPICS[12:], side)), encoding="utf-8")
    cfg = section("evaluate", batch_size=4, side_preference=dict(
        PARAMS["evaluate"]["side_preference"], heldout=[{"path": str(p), "side": s} for s, p in held.items()],
        bootstrap=300))
    pairs, sources = side_preference.collect(None, cfg.side_preference)
    assert sources == {str(held["right"]): 8, str(held["left"]): 8}
    model, tokenizer = load_with_adapters(tiny_model_dir, {"sft": right_trained})
    differences: dict = {}
    base = side_summary(model, tokenizer, "base", pairs, cfg, 0, differences)["heldout"]
    tuned = side_summary(model, tokenizer, "sft", pairs, cfg, 0, differences)["heldout"]
    for side in ("right_data", "left_data"):
        assert base[side]["shift"] == base[side]["shift_ci_low"] == base[side]["shift_ci_high"] == 0
        assert tuned[side]["shift_ci_low"] > 0, (side, tuned[side])
        assert tuned[side]["moved_right"] == 1.0
        assert tuned[side]["shift_per_token_ci_low"] > 0
    # the same pairs read as chosen/rejected by data side: right-voiced is chosen on right data only
    assert differences["sft"]["sum"].shape == (16,)
