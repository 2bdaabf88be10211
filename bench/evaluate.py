"""The ``evaluate`` stage's time, by part, on the default pipeline's models: its own command from ``dvc.yaml`` with
``params.yaml``, its outputs moved under ``--work`` (the pipeline's are not touched), MLflow off.

    python -m bench.evaluate --out bench-out/evaluate.json

Reports the stage's wall time, the seconds of each part as the stage measures them (``load``: the model and its
adapters; ``compass``: every model's forced-choice answers, the reversed twins and the DPO trajectory included;
``side_preference``: the held-out pairs), and whether the answers and metrics are byte-identical to the pipeline's
own (``reports/compass_answers.csv``, ``reports/metrics.json``), which they must be on the machine that produced them.
Needs the default pipeline's outputs (``make repro``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from demo.sweep import stage_commands
from politune.common import read_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", default="bench-out/evaluate-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy2(args.params, work / "params.yaml")
    [cmd] = stage_commands(Path("dvc.yaml"), read_yaml(args.params), work, names=("evaluate",))
    env = dict(os.environ, POLITUNE_MLFLOW="off")
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed:\n{proc.stderr[-4000:]}")
    found = re.search(r"seconds: (\{.*\})", proc.stderr + proc.stdout)
    if not found:
        raise SystemExit("evaluate did not log its parts' seconds")
    parts = ast.literal_eval(found.group(1))
    same = {name: (work / "reports" / name).read_bytes() == Path("reports", name).read_bytes()
            for name in ("compass_answers.csv", "metrics.json")}
    result = {"seconds": round(wall, 1), **{f"{part}_seconds": v for part, v in parts.items()},
              "same_as_pipeline": same}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
