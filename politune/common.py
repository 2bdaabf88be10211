"""Shared helpers: params loading, seeding, atomic writes, CLI scaffolding.

Every stage loads only the params sections it declares in ``SECTIONS``; ``tests/test_dvc_yaml.py`` checks that
those are exactly the sections ``dvc.yaml`` lists for the stage, so a key a script reads is always a key DVC tracks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("politune")


class ParamsError(ValueError):
    """A params.yaml value is missing or invalid; the message names the key."""


class InputError(ValueError):
    """Bad input data; the message names the file, row and field."""


class EndpointError(RuntimeError):
    """A model endpoint failed after its bounded retries; the message names the endpoint."""


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file as DVC does (ruamel.yaml, YAML 1.2), so a stage sees the values DVC tracks.

    PyYAML (YAML 1.1) differs on common params: ``1e-4`` is a string there and ``yes``/``on`` are booleans.
    """
    from ruamel.yaml import YAML

    with Path(path).open(encoding="utf-8") as fh:
        return YAML(typ="safe", pure=True).load(fh)


def read_yaml_text(text: str) -> Any:
    """Parse YAML text as DVC does (see ``read_yaml``)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load_params(path: str | os.PathLike, sections: Sequence[str]):
    """Only ``sections`` of the YAML params file, validated once into ``politune.schema.Params``; a missing or bad
    value fails here with one message naming its key. An entry ``section.key`` loads that key alone (dvc.yaml's
    per-key params, so that a stage reruns only for the keys it reads: ``score`` does not read
    ``annotate.threshold``); the keys a stage loads of a section make one of ``schema.SECTION_PARTS``' models."""
    path = Path(path)
    data = read_yaml(path) or {}
    params: dict[str, Any] = {}
    missing, keyed = [], set()
    for entry in sections:
        section, _, key = entry.partition(".")
        if section not in data:
            missing.append(section)
        elif key:
            keyed.add(section)
            if not isinstance(data[section], dict) or key not in data[section]:
                missing.append(entry)
            else:
                params.setdefault(section, {})[key] = data[section][key]
        else:
            params[section] = data[section]
    if missing:
        raise ParamsError(f"{path}: missing params section(s) {', '.join(missing)}")
    from politune.schema import SECTION_MODELS, Params, validate_sections

    problems = validate_sections(params, keyed)
    for section in sorted(keyed):  # a key no stage reads (a typo) fails every stage that reads the section
        problems += [f"{section}.{key}: not a key of the {section} section" for key in data[section]
                     if key not in SECTION_MODELS[section].model_fields]
    if problems:
        raise ParamsError(f"{path}: " + "; ".join(problems))
    return Params.model_validate(params)


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser


def stage_main(parser: argparse.ArgumentParser, sections: Sequence[str], run, argv: Sequence[str] | None = None):
    """A stage's command line: parse its paths (named in ``dvc.yaml``), load and validate the params sections it
    declares, then ``run(params, params_file, paths)`` in the library."""
    paths = parser.parse_args(argv)
    return run(load_params(paths.params, sections), paths.params, paths)


def run_main(fn, argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main`` with logging set up; expected errors print one clear line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        fn(argv)
    except (ParamsError, InputError, EndpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def cpu_info(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (``cpuinfo``: its text), e.g. "model name" and "flags";
    empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_bf16(cpuinfo: dict[str, str] | str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it, bf16 is emulated by torch and vLLM's
    CPU backend, several times slower than fp32 (measured on an AVX2-only CPU: vLLM decode 2.7x, DPO more).
    ``cpuinfo``: ``cpu_info()``'s fields or ``/proc/cpuinfo``'s text (default: this machine's)."""
    info = cpuinfo if isinstance(cpuinfo, dict) else cpu_info(cpuinfo)
    return bool(set(info.get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})


def native_bf16() -> bool:
    """Whether bf16 is computed natively here: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    try:
        import torch

        if torch.cuda.is_available():
            return bool(torch.cuda.is_bf16_supported())
    except ImportError:  # pragma: no cover
        pass
    return cpu_bf16()


def resolve_dtype(value: str) -> str:
    """A vLLM engine's ``dtype`` param: ``auto`` is bfloat16 where it is native (``native_bf16``), else float32."""
    return ("bfloat16" if native_bf16() else "float32") if value == "auto" else value


def resolve_bf16(value: bool | str) -> bool:
    """A TRL config's ``bf16`` param: ``auto`` is bf16 autocast where it is native (``native_bf16``)."""
    return native_bf16() if value == "auto" else bool(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it onto ``target`` (file or directory).

    Nothing is left at ``target`` if the body raises, and an earlier ``target`` is replaced only at the end.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def fingerprint(params, *inputs: str | os.PathLike) -> str:
    """Identify a run for resuming it: its params (``politune.schema.Params``) and its inputs' files (names, sizes,
    and the bytes of files under 64 MiB)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(params.as_dict(), sort_keys=True, default=str).encode())
    for root in map(Path, inputs):
        for path in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            digest.update(f"{path.relative_to(root) if path != root else path.name}:{path.stat().st_size}".encode())
            if path.stat().st_size < 64 * 2**20:
                digest.update(path.read_bytes())
    return digest.hexdigest()


def run_folder(directory: str | os.PathLike, run_id: str, change: bool = True) -> bool:
    """Whether ``directory`` holds the work of run ``run_id`` (its stamp says so). With ``change``, a folder of any
    other run is discarded (never a resume from a stale run) and the folder is made and stamped for this one."""
    directory = Path(directory)
    stamp = directory / "politune-run-id"
    same_run = stamp.exists() and stamp.read_text(encoding="utf-8") == run_id
    if change:
        if directory.exists() and not same_run:
            log.info("discarding the work of another run in %s", directory)
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp.write_text(run_id, encoding="utf-8")
    return same_run


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically with a stable key order (small metrics files kept in git)."""
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, ensure_ascii=False)
            fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with Path(path).open(encoding="utf-8") as fh:
        return json.load(fh)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Clock:
    """Wall seconds spent in each named part: ``with clock("part"): ...`` adds to ``clock.seconds["part"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
