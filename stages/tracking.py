"""MLflow mirror of each stage: params, metrics and artifacts. DVC stays the source of truth.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the working directory (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.common import flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = os.environ.get("POLITUNE_MLFLOW_EXPERIMENT", "politune")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[Any]:
    """Open an MLflow run for ``stage`` with its params logged; yields the ``mlflow`` module."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    mlflow.set_experiment(EXPERIMENT)
    tags = {"politune.stage": stage}
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(run_name=stage, tags=tags):
        flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield mlflow


def log_metrics(mlflow: Any, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) metrics dict."""
    flat = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        mlflow.log_metrics(flat, step=step)


def log_artifacts(mlflow: Any, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
