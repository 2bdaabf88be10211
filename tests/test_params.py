"""params.yaml is validated before any stage does work; a bad value names its key and touches no output."""

import copy
import subprocess
import sys

import pytest
import yaml

from politune.common import ParamsError, load_params
from politune.schema import validate_sections
from tests.helpers import PARAMS, ROOT


def test_shipped_params_are_valid():
    assert validate_sections(PARAMS) == []


@pytest.mark.parametrize(("path", "value", "message"), [
    (("ideology",), "centre", "ideology: 'centre' is not one of annotate.viewpoints ("),
    (("lora", "r"), -4, "lora.r: Input should be greater than 0 (got -4)"),
    (("annotate", "threshold"), 1.5, "annotate.threshold: Input should be less than or equal to 1 (got 1.5)"),
    (("annotate", "backend"), "ollama", "annotate.backend: Input should be 'vllm', 'serve', 'openai' or 'transformers'"),
    (("annotate", "thresold"), 0.5, "annotate.thresold: Extra inputs are not permitted"),
    (("ingest", "on_bad_row"), "ignore", "ingest.on_bad_row: Input should be 'skip' or 'fail'"),
    (("datasets", "test_size"), 1.0, "datasets.test_size: Input should be less than 1"),
    (("evaluate", "calibration"), "prior", "evaluate.calibration: Input should be 'none' or 'mean'"),
    (("evaluate", "templates"), ["Agree?"], "evaluate: Value error, templates[0] must contain {statement}"),
    (("annotate", "prompts"), {}, "ideology: 'right' has no prompts in annotate.prompts"),
])
def test_each_bad_value_names_its_key(tmp_path, path, value, message):
    params = copy.deepcopy(PARAMS)
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(file, list(params))
    assert message in str(info.value)
    assert str(info.value).count(";") == 0, "one problem, one message"


def test_generate_stage_exits_nonzero_without_touching_outputs(tmp_path):
    params = copy.deepcopy(PARAMS)
    params["annotate"]["threshold"] = 2
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params), encoding="utf-8")
    outs = {name: tmp_path / name for name in ("annotated.parquet", "annotation.json", "sample.md")}
    for path in outs.values():
        path.write_text("earlier result", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.generate", "--params", str(file), "--scores", "data/scores.parquet",
         "--model", "models/annotator", "--out", str(outs["annotated.parquet"]),
         "--report", str(outs["annotation.json"]), "--sample", str(outs["sample.md"]),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "annotate.threshold" in proc.stderr
    assert all(p.read_text(encoding="utf-8") == "earlier result" for p in outs.values())
    assert not (tmp_path / "work").exists()


def test_stages_that_read_keys_of_a_section_still_refuse_a_misspelt_key(tmp_path):
    """score and generate load the annotate keys they read, one by one; a key of that section that neither reads
    (a typo) fails both, with its name."""
    from stages import generate, score

    params = copy.deepcopy(PARAMS)
    params["annotate"]["treshold"] = 0.5
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params), encoding="utf-8")
    for stage in (score, generate):
        with pytest.raises(ParamsError, match="annotate.treshold: not a key of the annotate section"):
            load_params(file, stage.SECTIONS)
    del params["annotate"]["treshold"], params["annotate"]["score_prompt"]
    file.write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(ParamsError, match="missing params section.s. annotate.score_prompt"):
        load_params(file, score.SECTIONS)
    assert load_params(file, generate.SECTIONS).annotate.threshold == PARAMS["annotate"]["threshold"]


def test_params_are_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2, as DVC's own parser: ``1e-4`` is a float (PyYAML makes it a string, which crashed DPO deep in
    torch's optimiser); the value reaches DPOConfig with the type DVC tracks."""
    from dvc.utils.serialize import load_yaml
    from trl import DPOConfig

    from politune.dpo import resolve_precompute
    from politune.training import strict_config

    text = (ROOT / "params.yaml").read_text(encoding="utf-8").replace("  learning_rate: 5.0e-5\n",
                                                                    "  learning_rate: 1e-4\n", 1)
    assert "learning_rate: 1e-4" in text
    file = tmp_path / "params.yaml"
    file.write_text(text, encoding="utf-8")
    params = load_params(file, ["dpo"])
    assert params.dpo == load_yaml(file)["dpo"]
    assert params.dpo["learning_rate"] == 1e-4
    assert yaml.safe_load(text)["dpo"]["learning_rate"] == "1e-4"  # what the old reader gave the stage
    with pytest.raises(ParamsError, match="precompute_ref_log_probs: auto is not resolved"):
        strict_config(DPOConfig, "dpo", params.dpo, output_dir=str(tmp_path / "out"), seed=0)
    config = strict_config(DPOConfig, "dpo", resolve_precompute(dict(params.dpo), 172, "dpo"),
                           output_dir=str(tmp_path / "out"), seed=0)
    assert config.learning_rate == 1e-4 and config.precompute_ref_log_probs is False
