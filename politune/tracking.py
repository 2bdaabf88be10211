"""MLflow mirror of each stage: params, metrics and artifacts. DVC stays the source of truth.

Runs: one *parent* run per pipeline run or DVC experiment, and one *nested* run per stage under it. Stages run as
separate processes, so the parent is found again by a key: the DVC experiment name (``DVC_EXP_NAME``, or
"workspace" for ``dvc repro``), the baseline git commit and the hash of ``params.yaml``. Every stage of one
``dvc repro`` or ``dvc exp run`` shares that key; a changed params file starts a new parent. Tags on both:
``git.commit``, ``dvc.exp_name``; stage runs carry ``politune.stage``.

``POLITUNE_MLFLOW=off`` turns the mirror off (a machine without MLflow installed, a throw-away run): the stages
then write their DVC outputs only. The tracking URI is ``MLFLOW_TRACKING_URI`` when set (an ``mlflow server`` shared by a team), else a SQLite file at
the repository root (git-ignored). Queued experiments run in temporary copies under ``.dvc/tmp/exps/``; their
default store is still the main repository's, so the runs are not lost with the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from politune.common import flatten

EXPERIMENT = os.environ.get("POLITUNE_MLFLOW_EXPERIMENT", "politune")
PIPELINE_KEY = "politune.pipeline_key"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def repo_root() -> Path:
    """The DVC repository root; for a queued experiment's temporary copy, the repository that queued it."""
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def enabled() -> bool:
    return os.environ.get("POLITUNE_MLFLOW", "on").lower() not in ("off", "0", "false")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def pipeline_tags(params_file: str | os.PathLike = "params.yaml") -> dict[str, str]:
    """Tags identifying this pipeline run: experiment name, baseline commit, and the key shared by its stages."""
    exp = os.environ.get("DVC_EXP_NAME") or "workspace"
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git_commit() or "none"
    path = Path(params_file)
    params_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "none"
    return {"dvc.exp_name": exp, "git.commit": commit,
            PIPELINE_KEY: hashlib.sha256(f"{exp}:{commit}:{params_hash}".encode()).hexdigest()[:24]}


def parent_run_id(client, experiment_id: str, tags: dict[str, str]) -> str:
    """The parent run for this pipeline run: found by its key, or created (and ended; children attach later)."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_KEY}` = '{tags[PIPELINE_KEY]}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    exp, commit = tags["dvc.exp_name"], tags["git.commit"][:7]
    run = client.create_run(experiment_id, run_name=f"pipeline {exp} @ {commit}",
                            tags={**tags, "politune.role": "pipeline"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params, params_file: str | os.PathLike = "params.yaml") -> Iterator[Any]:
    """Open an MLflow run for ``stage``, nested under its pipeline's parent run, with its params logged.

    ``params``: the stage's ``politune.schema.Params``. Yields the ``mlflow`` module, or None when the mirror is
    off (``POLITUNE_MLFLOW=off``).
    """
    if not enabled():
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    tags = pipeline_tags(params_file)
    parent = parent_run_id(mlflow.tracking.MlflowClient(), experiment.experiment_id, tags)
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=True,
                          tags={**tags, "politune.stage": stage}):
        flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params.as_dict()).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield mlflow


def log_metrics(mlflow: Any, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) metrics dict."""
    flat = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat and mlflow is not None:
        mlflow.log_metrics(flat, step=step)


def log_artifacts(mlflow: Any, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    path = Path(path)
    if mlflow is None:
        return
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
