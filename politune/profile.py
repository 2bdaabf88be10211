"""Apply a params profile: merge an overlay (``profiles/*.yaml``) into ``params.yaml``, keeping its comments.

    python -m politune.profile profiles/paper-llama3-8b.yaml     # then: dvc exp run -n paper-llama3-8b

An overlay holds only the keys it changes, nested like ``params.yaml``; mappings merge key by key, everything else
(lists, scalars) replaces. ``extends: other.yaml`` (beside it) applies that overlay first. Every key must already exist in ``params.yaml`` (a typo fails here, not hours later),
and the result is validated by the params schema before anything is written. Not a pipeline stage: a helper to
select a configuration, whose result DVC then tracks like any params change.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from politune.common import ParamsError, atomic_path, run_main
from politune.schema import validate_sections


def merge(base: dict[str, Any], overlay: dict[str, Any], where: str = "") -> None:
    """Merge ``overlay`` into ``base`` in place; unknown keys raise (except under free-form mappings)."""
    for key, value in overlay.items():
        path = f"{where}{key}"
        if key not in base and not _free_form(where):
            raise ParamsError(f"{path}: not a key of params.yaml (a typo?)")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, path + ".")
        else:
            base[key] = value


def _free_form(where: str) -> bool:
    """Sections passed through as they are (engine options, LoRA/TRL fields): new keys are allowed there."""
    return where in ("annotate.engine.", "judge.serve.", "lora.", "sft.", "dpo.", "kto.", "orpo.", "cpo.")


def apply(profile: str | Path, params: str | Path = "params.yaml") -> dict[str, Any]:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments and key order survive
    yaml.width = 4096
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(Path(params).read_text(encoding="utf-8"))
    for overlay in reversed(chain(profile)):
        merge(doc, overlay)
    plain = YAML(typ="safe").load(_dump(yaml, doc))
    problems = validate_sections(plain)
    if problems:
        raise ParamsError(f"{profile}: " + "; ".join(problems))
    with atomic_path(params) as tmp:
        tmp.write_text(_dump(yaml, doc), encoding="utf-8")
    return plain


def chain(profile: str | Path) -> list[dict[str, Any]]:
    """The overlay and those it extends, nearest first."""
    from ruamel.yaml import YAML

    overlays, path = [], Path(profile)
    while path is not None:
        if len(overlays) > 8:
            raise ParamsError(f"{profile}: 'extends' goes round in a circle")
        overlay = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
        overlay.pop("profile", None)  # the overlay's own description
        parent = overlay.pop("extends", None)
        overlays.append(overlay)
        path = path.parent / parent if parent else None
    return overlays


def _dump(yaml, doc) -> str:
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="overlay file, e.g. profiles/paper-llama3-8b.yaml")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    apply(args.profile, args.params)
    print(f"{args.params}: applied {args.profile}; run it with `dvc exp run` (or `dvc exp run --queue`)")


if __name__ == "__main__":
    run_main(main)
