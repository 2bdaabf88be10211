"""Stage ``ingest``: read raw posts (JSONL, CSV, Parquet), normalise them, write one Parquet table.

Field names follow the common dumps: ``text``, ``body`` (Reddit comments), ``title`` + ``selftext`` (Reddit
submissions), ``content`` (Truth Social / Mastodon, in HTML). HTML tags, entities, URLs and control characters are
removed; empty posts, ``[deleted]``/``[removed]`` placeholders and exact duplicates are dropped and counted. A row
that cannot be read is reported with its file, row and field; ``ingest.on_bad_row`` says whether to skip it or fail.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from politune.common import InputError, atomic_path, write_json
from politune.schema import Ingest, Params

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
log = logging.getLogger("politune.ingest")


class _TextExtractor(HTMLParser):
    BLOCK = {"p", "br", "div", "li", "blockquote", "h1", "h2", "h3", "h4", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self.BLOCK:
            self.parts.append(" ")

    def handle_data(self, data):
        self.parts.append(data)


def clean_text(raw: str) -> str:
    """Strip HTML and URLs, drop control characters, collapse whitespace."""
    text = raw
    if "<" in text and ">" in text:
        parser = _TextExtractor()
        parser.feed(text)
        parser.close()
        text = "".join(parser.parts)
    text = html.unescape(text)
    text = URL_RE.sub(" ", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def extract_text(row: dict[str, Any], fields: list[str]) -> str | None:
    """Return the post text of a record: ``title`` + ``selftext`` if present, else the first text field."""
    title = row.get("title")
    if isinstance(title, str) and title.strip() and "selftext" in row:
        body = row.get("selftext")
        body = body if isinstance(body, str) and body.strip() not in {"", "[deleted]", "[removed]"} else ""
        return f"{title.strip()} {body}".strip()
    for field in fields:
        value = row.get(field)
        if isinstance(value, str):
            return value
    return None


def _created(record: dict[str, Any]) -> str | None:
    """The post's time as given (Reddit ``created_utc`` epoch seconds, Truth Social ``created_at``), as text."""
    for key in ("created_utc", "created_at", "created"):
        value = record.get(key)
        if value not in (None, ""):
            return str(value)
    return None


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield ``(row_number, record, problem)``; row numbers are 1-based lines (CSV: counting the header)."""
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield lineno, None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"invalid JSON ({exc.msg}, column {exc.colno})"
                    continue
                if not isinstance(record, dict):
                    yield lineno, None, "a JSON object was expected"
                    continue
                yield lineno, record, None
        return
    import pandas as pd

    try:
        if kind == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
            offset = 2
        else:
            frame = pd.read_parquet(path)
            offset = 1
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.EmptyDataError:
        return
    except Exception as exc:  # pyarrow/pandas parse errors carry no common base class
        raise InputError(f"{path}: cannot be read as {kind}: {exc}") from exc
    for i, record in enumerate(frame.to_dict(orient="records")):
        yield i + offset, record, None


def ingest(raw_dir: Path, cfg: Ingest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fields = cfg.text_fields
    placeholders = {p.lower() for p in cfg.placeholders}
    policy = cfg.on_bad_row
    max_chars = cfg.max_chars
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise InputError(f"{raw_dir}: no input files ({', '.join(sorted(SUFFIXES))})")
    counts: Counter[str] = Counter()
    problems: list[str] = []
    posts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in files:
        rel = path.relative_to(raw_dir).as_posix()
        n_file = 0
        for row, record, problem in read_records(path):
            counts["rows_read"] += 1
            n_file += 1
            if problem is None:
                text = extract_text(record, fields)
                if text is None:
                    problem = f"no text field (expected one of {', '.join(fields)} or title+selftext)"
            if problem is not None:
                message = f"{path}:{row}: {problem}"
                if policy == "fail":
                    raise InputError(message + " (set ingest.on_bad_row: skip to skip such rows)")
                counts["bad_row"] += 1
                if len(problems) < 50:
                    problems.append(message)
                log.warning("skipping %s", message)
                continue
            if text.strip().lower() in placeholders:
                counts["placeholder"] += 1
                continue
            text = clean_text(text)
            if not text:
                counts["empty"] += 1
                continue
            if len(text) > max_chars:
                counts["truncated"] += 1
                text = text[:max_chars].rsplit(" ", 1)[0]
            if text in seen:
                counts["duplicate"] += 1
                continue
            seen.add(text)
            post_id = record.get("id")
            post = {
                "id": str(post_id) if post_id not in (None, "") else f"{rel}:{row}",
                "source": rel,
                "text": text,
                "label": str(record["label"]) if record.get("label") not in (None, "") else None,
                "subreddit": str(record["subreddit"]) if record.get("subreddit") else None,
                "created": _created(record),
            }
            posts.append(post)
        if n_file == 0:
            counts["empty_files"] += 1
            problems.append(f"{path}: empty file")
    ids = Counter(p["id"] for p in posts)
    for post in posts:  # ids must be unique downstream: qualify repeats with their source
        if ids[post["id"]] > 1:
            post["id"] = f"{post['source']}:{post['id']}"
    report = {
        "files": len(files),
        "rows_read": counts["rows_read"],
        "posts_out": len(posts),
        "skipped": {k: counts[k] for k in ("bad_row", "placeholder", "empty", "duplicate")},
        "truncated": counts["truncated"],
        "empty_files": counts["empty_files"],
        "labels": dict(sorted(Counter(p["label"] or "none" for p in posts).items())),
        "problems": problems,
    }
    return posts, report


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    posts, report = ingest(Path(paths.raw), params.ingest)
    if not posts:
        raise InputError(f"{paths.raw}: no usable post after cleaning ({report['skipped']}); add posts to the folder")
    import pandas as pd

    from politune.tracking import log_metrics, stage_run

    with stage_run("ingest", params, params_file) as mlflow:
        with atomic_path(paths.out) as tmp:
            pd.DataFrame(posts).to_parquet(tmp, index=False)
        write_json(paths.report, report)
        log_metrics(mlflow, {k: v for k, v in report.items() if k != "problems"})
    log.info("ingested %d posts from %d rows", report["posts_out"], report["rows_read"])

