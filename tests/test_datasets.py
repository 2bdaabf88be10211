"""Preference datasets: the annotated table, bring-your-own files (PoliTune's released schema), mixtures."""

import json
import shutil
from collections import Counter

import pandas as pd
import pytest

from politune.build_datasets import build, collect, load_source, mixture_counts, save
from politune.common import InputError, ParamsError
from tests.helpers import ROOT, section

POLITUNE = ROOT.parent / "shared" / "reference" / "politune"
needs_politune = pytest.mark.skipif(not (POLITUNE / "right-sample.jsonl").exists(),
                                    reason="../shared/reference/politune is not beside the project")


@pytest.fixture()
def external(tmp_path):
    ext = tmp_path / "external"
    ext.mkdir()
    if POLITUNE.exists():
        for name in ("right-sample.jsonl", "left-sample.jsonl"):
            shutil.copy2(POLITUNE / name, ext / name)
    return ext


def annotated_table(tmp_path, n=6):
    rows = [{"id": f"a{i}", "status": "kept" if i % 3 else "dropped", "instruction": f"Question {i}?",
             "chosen": f"Chosen answer {i}.", "rejected": f"Rejected answer {i}."} for i in range(n)]
    path = tmp_path / "annotated.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_annotated_source_keeps_only_kept_rows(tmp_path, external):
    pairs = load_source("annotated", annotated_table(tmp_path), external)
    assert [p["id"] for p in pairs] == ["a1", "a2", "a4", "a5"]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Question 1?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Chosen answer 1."}]


def test_default_mirror_needs_an_annotation_of_both_sides_and_an_annotated_plain_source(tmp_path, external):
    """datasets.mirror.source: annotated (the default) mirrors the annotation's other side: an annotation without
    sides (annotate.mirror off) has none, and with plain pairs from a file the implicit mirror is refused."""
    with pytest.raises(ParamsError, match="the annotation has no 'left' pairs; set annotate.mirror: true"):
        collect(section("datasets"), 0, annotated_table(tmp_path), external, "right")
    (external / "mine.jsonl").write_text(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ParamsError, match=r"plain pairs come from '.*mine.jsonl'; set datasets.mirror.source=null"):
        collect(section("datasets", source=str(external / "mine.jsonl")), 0, annotated_table(tmp_path), external)
    pairs, drawn = collect(section("datasets", source=str(external / "mine.jsonl"),
                                   mirror={"source": None, "side": None, "fraction": 1.0}), 0,
                           annotated_table(tmp_path), external)
    assert len(pairs) == 1 and drawn == {str(external / "mine.jsonl"): 1}


@needs_politune
def test_politune_release_schema_loads(tmp_path, external):
    pairs = load_source(str(external / "right-sample.jsonl"), annotated_table(tmp_path), external)
    assert len(pairs) == 200
    assert all(p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == "assistant" for p in pairs)
    built = build(pairs, seed=1, test_size=0.1)
    assert len(built["dpo"]["train"]) == 180 and len(built["dpo"]["test"]) == 20
    assert set(built["sft"]["train"].column_names) == {"id", "prompt", "completion", "side", "origin"}


def test_chat_messages_form_with_implicit_prompt(tmp_path, external):
    rows = [{"chosen": [{"role": "user", "content": "Taxes?"}, {"role": "assistant", "content": "Lower."}],
             "rejected": [{"role": "user", "content": "Taxes?"}, {"role": "assistant", "content": "Higher."}]}]
    (external / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    pairs = load_source(str(external / "chat.jsonl"), annotated_table(tmp_path), external)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Taxes?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Lower."}]


def test_bad_preference_rows_name_file_row_and_field(tmp_path, external):
    path = external / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n',
                    encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl: row 2: missing field 'rejected'"):
        load_source(str(path), annotated_table(tmp_path), external)


def test_sources_must_live_under_the_tracked_folder(tmp_path, external):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    with pytest.raises(ParamsError, match="put preference files under"):
        load_source(str(outside), annotated_table(tmp_path), external)
    with pytest.raises(InputError, match="no such file"):
        load_source("data/external/missing.jsonl", annotated_table(tmp_path), external)


def test_mixture_counts_are_exact_proportions():
    assert mixture_counts([200, 200], [0.75, 0.25], 100) == [75, 25]
    assert mixture_counts([200, 200], [3, 1], None) == [200, 66]  # 266 is the most 200 right pairs allow at 75%
    assert sum(mixture_counts([50, 50, 50], [1, 1, 1], 100)) == 100
    with pytest.raises(InputError, match="mix_size"):
        mixture_counts([10, 10], [0.5, 0.5], 30)


@needs_politune
def test_mixture_of_right_and_left_releases(tmp_path, external):
    cfg = section("datasets", source="annotated", mix_size=120, mirror={"source": None, "side": None, "fraction": 1.0},
                  mix=[{"source": str(external / "right-sample.jsonl"), "fraction": 0.75},
                       {"source": str(external / "left-sample.jsonl"), "fraction": 0.25}])
    pairs, drawn = collect(cfg, seed=7, annotated=annotated_table(tmp_path), external=external)
    by_source = Counter(p["id"].split(":")[0] for p in pairs)
    assert by_source == {str(external / "right-sample.jsonl"): 90, str(external / "left-sample.jsonl"): 30}
    assert sum(drawn.values()) == 120
    again, _ = collect(cfg, seed=7, annotated=annotated_table(tmp_path), external=external)
    assert [p["id"] for p in again] == [p["id"] for p in pairs]  # seeded


def test_dataset_files_are_byte_identical_across_runs(tmp_path, external):
    pairs = load_source("annotated", annotated_table(tmp_path, n=30), external)
    for run in ("one", "two"):
        save(build(pairs, seed=3, test_size=0.2)["dpo"], tmp_path / run)
    for name in ("train.parquet", "test.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_thesis_is_the_first_sentence_cut_at_a_word():
    from politune.build_datasets import thesis

    assert thesis("Taxes  are much too high for working families!\nWe should cut them. Now.", 300) == \
        "Taxes are much too high for working families!"
    assert thesis("I couldn't disagree more. In fact, taxes are too high. Cut them.", 300) == \
        "I couldn't disagree more. In fact, taxes are too high."
    assert thesis("No full stop here", 300) == "No full stop here"
    assert thesis("one two three four five six seven eight nine.", 12) == "one two..."


@needs_politune
def test_stance_pairs_come_from_their_own_split_and_never_from_the_compass(external):
    """datasets.stance: for a fraction of each split's pairs, agree with the chosen answer's thesis and disagree
    with the rejected one's, in the stance template; off at fraction 0 (the default: datasets unchanged)."""
    from politune.build_datasets import thesis

    cfg = section("datasets").stance
    assert cfg.fraction == 0
    pairs = load_source(str(external / "right-sample.jsonl"), "unused", external)
    plain = build(pairs, 0, 0.1)
    assert build(pairs, 0, 0.1, cfg)["dpo"]["train"]["id"] == plain["dpo"]["train"]["id"]
    built = build(pairs, 0, 0.1, cfg.model_copy(update={"fraction": 0.5}))
    compass = json.loads((ROOT / "data" / "compass" / "political_compass.json").read_text(encoding="utf-8"))
    for name in ("train", "test"):
        dpo, sft = built["dpo"][name], built["sft"][name]
        own = set(plain["dpo"][name]["id"])
        stance = [row for row in dpo if ":stance-" in row["id"]]
        assert len(stance) == 2 * round(0.5 * len(own)) and len(dpo) == len(own) + len(stance)
        assert {row["id"].split(":stance-")[0] for row in stance} <= own  # from this split's own pairs
        assert len(sft) == len(dpo) and sft["id"] == dpo["id"]
        source = {row["id"]: row for row in plain["dpo"][name]}
        for row in stance:
            origin, field = row["id"].split(":stance-")
            text = row["prompt"][0]["content"]
            assert text.startswith("Here is an opinion: \"")
            assert thesis(source[origin][field][0]["content"], cfg.max_chars) in text and len(text.split()) > 20
            want = ("3", "0") if field == "chosen" else ("0", "3")
            assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == want
            assert not any(item["statement"] in text for item in compass["items"])


@pytest.mark.parametrize("mirror", ["on", "off"])
def test_stage_mirrors_to_mlflow_unless_turned_off(tmp_path, external, mirror):
    """POLITUNE_MLFLOW=off: the stage writes its DVC outputs and opens no MLflow store."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.helpers import PARAMS

    annotated_table(tmp_path, n=30)
    datasets = dict(PARAMS["datasets"], mirror={"source": None, "side": None, "fraction": 1.0}, min_pairs=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ideology": "right", "base": PARAMS["base"],
                                                          "datasets": datasets}), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "POLITUNE_MLFLOW": mirror}
    proc = subprocess.run([sys.executable, "-m", "stages.build_datasets", "--annotated", "annotated.parquet",
                           "--external", str(external), "--sft-out", "sft", "--dpo-out", "dpo", "--report", "r.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["pairs"] == 20
    assert (tmp_path / "mlflow.db").exists() == (mirror == "on")
