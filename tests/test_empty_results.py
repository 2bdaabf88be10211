"""No empty dataset flows downstream: annotation that keeps nothing, or too few pairs, fails and says what to change."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from politune.ingest import ingest
from tests.helpers import PARAMS, ROOT, section, with_absolute_paths



def run_stage(module, args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_too_few_pairs_fail_build_datasets(tmp_path):
    rows = [{"id": f"a{i}", "status": "kept" if i < 3 else "dropped", "instruction": "Q?", "chosen": "Yes, do it.",
             "rejected": "No, never."} for i in range(10)]
    pd.DataFrame(rows).to_parquet(tmp_path / "annotated.parquet")
    (tmp_path / "external").mkdir()
    datasets = dict(PARAMS["datasets"], mirror={"source": None, "side": None, "fraction": 1.0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ideology": "right", "base": PARAMS["base"],
                                                          "datasets": datasets}))
    proc = run_stage("stages.build_datasets", ["--annotated", "annotated.parquet", "--external", "external",
                                               "--sft-out", "sft", "--dpo-out", "dpo", "--report", "r.json"], tmp_path)
    assert proc.returncode == 1
    assert "only 3 preference pairs" in proc.stderr and "lower annotate.threshold" in proc.stderr
    assert not any((tmp_path / p).exists() for p in ("sft", "dpo", "r.json"))


@pytest.mark.slow
def test_annotation_keeping_nothing_fails(tmp_path, tiny_model_dir):
    posts, _ = ingest(ROOT / "data" / "raw", section("ingest"))
    pd.DataFrame(posts[:8]).to_parquet(tmp_path / "posts.parquet")
    params = {"ideology": "right", "base": PARAMS["base"],
              "annotate": dict(with_absolute_paths(PARAMS)["annotate"], backend="transformers", threshold=1.0)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    proc = run_stage("stages.score", ["--posts", "posts.parquet", "--model", str(tiny_model_dir), "--out",
                                      "scores.parquet", "--report", "scores.json", "--plot", "plot.json",
                                      "--work", "work/score"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_stage("stages.generate", ["--scores", "scores.parquet", "--model", str(tiny_model_dir), "--out",
                                         "annotated.parquet", "--report", "a.json", "--sample", "s.md",
                                         "--work", "work/generate"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "annotation kept no post" in last and "lower annotate.threshold" in last
    assert not any((tmp_path / p).exists() for p in ("annotated.parquet", "a.json", "s.md"))
    assert (tmp_path / "scores.parquet").exists(), "the scores already made are kept"
