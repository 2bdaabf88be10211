"""Triplet quality (copy rate, stance accuracy, distinctness) and the few-shot examples of the generate stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from politune import triplet_quality as tq
from politune.annotate import annotate, answer_chat, build_chat, instruction_chat, load_examples
from politune.common import InputError
from tests.helpers import PARAMS, ROOT, section
from tests.test_annotate_logic import Scripted, posts

VIEWPOINT = PARAMS["annotate"]["viewpoints"]["right"]
REFERENCE = ROOT.parent / "shared" / "reference" / "politune"


def cfg(answers="joint", **quality):
    return section("annotate", calibrate=False, mirror=False, answers=answers,
                   quality={**PARAMS["annotate"]["quality"], "stance": True, **quality})


def test_copy_check_names_the_field_and_what_it_copied():
    check = tq.CopyCheck({"viewpoint": [VIEWPOINT], "instructions": ["Write a JSON object with three fields"],
                          "examples": []}, n=4, threshold=0.5)
    post = "Landlords should not be able to evict families for being a week late on rent."
    good = {"instruction": "Should a landlord be allowed to evict a family over late rent?",
            "chosen": "Property rights matter, but a week late is no reason to put children on the street.",
            "rejected": "A lease is a contract; the owner decides when it is broken."}
    assert check.copied_from(good, post) is None
    assert check.copied_from({**good, "instruction": post}, post) == ("instruction", "post")
    assert check.copied_from({**good, "chosen": f"The answer by {VIEWPOINT}."}, post) == ("chosen", "viewpoint")
    assert check.copied_from({**good, "rejected": "Write a JSON object with three fields, please."}, post) == (
        "rejected", "instructions")
    assert tq.overlap("a b c d e", tq.ngrams("x a b c d", 4), 4) == 0.5  # 1 of its 2 4-grams


class Copier(Scripted):
    """Scripted replies, but the instruction is the post itself: for post p1 on the first attempt only, for p2 on
    every attempt."""

    def __init__(self):
        super().__init__()
        self.attempts: dict[str, int] = {}

    def generate_json(self, chats, schema, max_tokens, temperature, seed):
        out = super().generate_json(chats, schema, max_tokens, temperature, seed)
        if "instruction" not in schema["properties"]:
            return out  # answers separate: an answer reply
        for k, chat in enumerate(chats):
            post = chat[-1]["content"].split('"', 2)[1]
            key = "p" + post.split()[1]
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if key == "p2" or (key == "p1" and self.attempts[key] == 1):
                out[k] = json.dumps({**json.loads(out[k]), "instruction": post})
        return out


@pytest.mark.parametrize("answers", ["joint", "separate"])
def test_a_copied_triplet_is_retried_then_dropped_and_counted(answers):
    cfg = globals()["cfg"]
    table, report = annotate(posts(), Copier(), "right", cfg(answers), seed=0)  # threshold 0.4: p0-p3 kept
    q = report["triplet_quality"]
    status = dict(zip(table["id"], table["status"]))
    assert status["p1"] == "kept" and status["p2"] == "invalid", "p1 copied once, then wrote its own instruction"
    assert table.set_index("id").at["p2", "invalid_reason"] == "copy:post"
    assert q["invalid_copy"] == 1 and q["invalid_schema"] == 0 and report["invalid"] == 1
    assert q["copy_rate_first_attempt"]["value"] == 0.5 and q["copy_rate_first_attempt"]["n"] == 4
    assert q["copy_sources_first_attempt"]["post"] == 2
    assert q["copy_rate_kept"]["value"] == 0.0
    # measured, not rejected: no retry, every post kept with its first reply, both copies among the kept
    table, report = annotate(posts(), Copier(), "right", cfg(answers, reject_copies=False), seed=0)
    assert report["invalid"] == 0 and report["triplet_quality"]["copy_rate_kept"]["value"] == 0.5
    assert report["triplet_quality"]["copy_rate_first_attempt"]["value"] == 0.5


@pytest.mark.parametrize("answers", ["joint", "separate"])
def test_stance_accuracy_and_the_filter_read_each_answer_without_the_prompt(answers):
    table, report = annotate(posts(), Scripted(), "right", cfg(answers), seed=0)
    acc = report["triplet_quality"]["stance_accuracy"]
    assert acc["value"] == 1.0 and acc["n"] == 4, "the chosen answer names its side, the rejected another"
    if answers == "separate":  # the rejected answer was written in the opposite's chat, in its voice
        assert set(table[table["status"] == "kept"]["rejected"].str.split().str[1]) == {"left"}

    class Wrong(Scripted):  # p0's answers name the other side than the chat's (its chosen answer reads left)
        def generate_json(self, chats, *args):
            out = super().generate_json(chats, *args)
            return [o.replace("right", "?").replace("left", "right").replace("?", "left") if "p0" in o else o
                    for o in out]

    table, report = annotate(posts(), Wrong(), "right", cfg(answers), seed=0)
    assert report["triplet_quality"]["stance_accuracy"]["value"] == 0.75 and report["invalid"] == 0
    table, report = annotate(posts(), Wrong(), "right", cfg(answers, stance_filter=True), seed=0)
    assert report["triplet_quality"]["stance_accuracy"]["value"] == 0.75, "measured before the filter"
    assert report["triplet_quality"]["invalid_stance"] == 1 and report["kept"] == 3
    assert table.set_index("id").at["p0", "status"] == "invalid"


def test_near_duplicates_and_distinct_n():
    texts = ["cut taxes and shrink the federal government now", "cut taxes and shrink the federal government today",
             "fund public schools with a tax on the rich"]
    assert tq.near_duplicates(texts, 4, 0.6).tolist() == [1.0, 1.0, 0.0]
    assert tq.distinct_n(["a b c d", "a b c d"], 4) == 0.5 and tq.distinct_n(texts[2:], 4) == 1.0
    r = tq.rate([0, 1, 1, 0, 1, 0, 1, 1], 500, 0)
    assert r["value"] == 0.625 and 0.2 < r["ci_low"] < 0.625 < r["ci_high"] <= 1.0
    assert tq.rate([1, 1, 1], 500, 0) == {"n": 3, "value": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_few_shot_examples_come_before_the_post_as_earlier_turns():
    c = cfg()
    examples = load_examples(c)
    assert [len(examples[s]) for s in ("right", "left")] == [2, 2] and all(e.side == "right" for e in examples["right"])
    chat = build_chat(c, "right", "Secure the border.", examples["right"])
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert examples["right"][0].post in chat[1]["content"] and chat[-1]["content"].count("Secure the border.") == 1
    assert json.loads(chat[2]["content"]) == {k: getattr(examples["right"][0], k)
                                              for k in ("instruction", "chosen", "rejected")}
    # answers separate: the instruction from the post, each answer in its own voice's chat with its own examples
    chat = instruction_chat(c, "right", "Secure the border.", examples["right"])
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert json.loads(chat[2]["content"]) == {"instruction": examples["right"][0].instruction}
    chat = answer_chat(c, "left", "Should the border be secured?", examples["left"])
    assert "left-wing" in chat[0]["content"] and "left-wing" in chat[-1]["content"]
    assert examples["left"][1].instruction in chat[3]["content"]
    assert json.loads(chat[4]["content"]) == {"answer": examples["left"][1].chosen}
    assert "Should the border be secured?" in chat[-1]["content"]
    zero = section("annotate", few_shot={"path": PARAMS["annotate"]["few_shot"]["path"], "shots": 0})
    assert [m["role"] for m in build_chat(zero, "left", "x", load_examples(zero)["left"])] == ["system", "user"]


def test_a_bad_example_file_names_the_file_row_and_field(tmp_path):
    path = tmp_path / "examples.jsonl"
    good = json.loads((ROOT / PARAMS["annotate"]["few_shot"]["path"]).read_text().splitlines()[0])
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": None}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path}: row 2, field chosen"):
        load_examples(section("annotate", few_shot={"path": str(path), "shots": 1}))
    path.write_text(json.dumps(good) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="0 examples of side 'left', fewer than annotate.few_shot.shots=1"):
        load_examples(section("annotate", few_shot={"path": str(path), "shots": 1}))
    with pytest.raises(InputError, match="no such file"):
        load_examples(section("annotate", few_shot={"path": str(tmp_path / "none.jsonl"), "shots": 1}))


def test_few_shot_examples_are_never_evaluation_pairs():
    examples = [json.loads(line) for line in (ROOT / "data/fewshot/examples.jsonl").read_text().splitlines()]
    heldout = {json.loads(line)["prompt"] for side in ("right", "left")
               for line in (ROOT / f"data/heldout/politune/{side}.jsonl").read_text().splitlines()}
    assert len(heldout) == 60 and not {e["instruction"] for e in examples} & heldout
    assert {e["side"] for e in examples} == {"right", "left"}


@pytest.mark.slow
def test_stance_accuracy_of_the_real_annotator_on_the_authors_pairs(smollm2_dir):
    """SmolLM2's likelihood classifier reads the PoliTune authors' pairs (hand-made good triplets): well above
    chance on them, the complement on the same pairs swapped, and about chance where both answers voice one side."""
    from politune.backends import TransformersBackend

    backend = TransformersBackend(str(smollm2_dir), section("annotate").transformers, seed=0)
    prefix, viewpoints = PARAMS["annotate"]["score_prefix"], PARAMS["annotate"]["viewpoints"]
    opposite = {"right": "left", "left": "right"}
    rows = {side: [json.loads(line) for line in (REFERENCE / f"{side}-sample.jsonl").read_text().splitlines()[:30]]
            for side in ("right", "left")}
    sides = ["right"] * 30 + ["left"] * 30
    chosen = tq.stance_margins(backend, prefix, viewpoints, sides, opposite,
                               [r["chosen"] for s in ("right", "left") for r in rows[s]], 256)
    rejected = tq.stance_margins(backend, prefix, viewpoints, sides, opposite,
                                 [r["rejected"] for s in ("right", "left") for r in rows[s]], 256)
    good = tq.rate(tq.stance_correct(chosen, rejected), 1000, 0)
    assert good["ci_low"] > 0.5, good
    assert tq.rate(tq.stance_correct(rejected, chosen), 1000, 0)["value"] == pytest.approx(1 - good["value"])
    # both answers voice the triplet's side (two chosen answers of that side): no stance to tell them apart
    same = np.concatenate([tq.stance_correct(chosen[:30], np.roll(chosen[:30], 1)),
                           tq.stance_correct(chosen[30:], np.roll(chosen[30:], 1))])
    assert 0.3 <= same.mean() <= 0.7, same.mean()


def test_compare_right_minus_left_on_the_pairs_both_runs_measured(tmp_path):
    from politune.compare import difference, markdown, read_table, side_table

    header = "pair,group,data_side,base_d,base_d_per_token,dpo_d,dpo_d_per_token\n"
    pairs = [("h1", "heldout", "right"), ("h2", "heldout", "right"), ("h3", "heldout", "left"),
             ("h4", "heldout", "left"), ("t1", "test_split", "right")]
    for name, shift in (("right", 2.0), ("left", -1.0)):
        (tmp_path / name / "reports").mkdir(parents=True)
        rows = [f"{p},{g},{s},0.5,0.1,{0.5 + shift + 0.1 * k},0.1" for k, (p, g, s) in enumerate(pairs)]
        (tmp_path / name / "reports" / "side_preference.csv").write_text(header + "\n".join(rows) + "\n")
    right, left = (read_table("workspace", repo=str(tmp_path / n), path="reports/side_preference.csv")
                   for n in ("right", "left"))
    result = difference(right, left, "dpo", n_boot=200)
    assert set(result) == {"heldout", "test_split"}
    for side in ("right_data", "left_data"):
        v = result["heldout"][side]
        assert v["pairs"] == 2 and v["difference"] == pytest.approx(3.0) and v["ci_low"] == v["ci_high"] == 3.0
        assert v["more_right"] == 1.0
    assert "| heldout | +3.00 [+3.00, +3.00]" in markdown(result, "dpo", "HEAD", "left")
    same = difference(right, right, "base", n_boot=200)
    assert all(v["difference"] == 0 for g in same.values() for v in g.values())
    with pytest.raises(InputError, match="no column 'step-5_d'"):
        difference(right, left, "step-5")
    with pytest.raises(InputError, match="no such file"):
        read_table("workspace", repo=str(tmp_path), path="reports/side_preference.csv")
    assert side_table(str(ROOT)) == "reports/side_preference.csv"
