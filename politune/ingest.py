"""Stage ``ingest``: read raw posts, normalise them, write one Parquet table.

Formats, by file name: JSON lines (``.jsonl``, ``.ndjson``), JSON (``.json``: an array of objects, or lines), CSV
(``.csv``: the delimiter sniffed: comma, semicolon, tab or bar), TSV (``.tsv``: the Truth Social dump's ``truths.tsv``) and
Parquet, each optionally compressed (``.gz``, ``.bz2``, ``.zst``, ``.xz``). A compressed file with no format in its
name (the Reddit Politosphere's ``comments_2019-01.bz2``, Pushshift's ``RC_2019-01.zst``) is read as JSON lines, or as
a JSON array, by its first character. A file in the folder that is none of these is named in the report
(``not_read``), never skipped in silence; a file that claims a format and cannot be read stops the stage with its
name.

Field names follow the common dumps: ``text``, ``body`` (Reddit comments), ``title`` + ``selftext`` (Reddit
submissions), ``content`` (Truth Social / Mastodon, in HTML). HTML tags, entities, URLs and control characters are
removed; empty posts, ``[deleted]``/``[removed]`` placeholders and exact duplicates are dropped and counted. A row
that cannot be read is reported with its file, row and field; ``ingest.on_bad_row`` says whether to skip it or fail.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import html
import io
import json
import logging
import lzma
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from politune.common import InputError, atomic_path, write_json
from politune.schema import Ingest, Params

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
CSV_DELIMITERS = ",;\t|"
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


def file_format(path: Path) -> tuple[str | None, str | None, str | None]:
    """``(format, compression, why_not)`` of a raw file from its name: format one of ``SUFFIXES``' values, or
    ``sniff`` for a compressed file whose name gives no format; ``why_not`` says why a file is not a data file."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    kind = SUFFIXES.get(Path(name).suffix)
    if kind:
        return kind, compression, None
    if compression:
        return "sniff", compression, None
    return None, None, f"not a data file (formats: {', '.join(SUFFIXES)}, optionally {', '.join(COMPRESSIONS)})"


def open_raw(path: Path, compression: str | None):
    """The file's bytes, decompressed as they are read."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _json_records(fh) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """JSON lines from a binary stream: ``(line, record, problem)``."""
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


def _first_char(path: Path, compression: str | None) -> str:
    with open_raw(path, compression) as fh:
        head = fh.read(4096).lstrip()
    return head[:1].decode("ascii", errors="replace")


def _delimiter(path: Path, compression: str | None, kind: str) -> str:
    """Tab for TSV; for CSV, sniffed from the file's first 64 KiB among ``CSV_DELIMITERS`` (a comma if unsure)."""
    if kind == "tsv":
        return "\t"
    with open_raw(path, compression) as fh:
        sample = fh.read(65536).decode("utf-8", errors="replace")
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield ``(row_number, record, problem)``; row numbers are 1-based lines of the (decompressed) file (CSV and
    TSV: counting the header; a JSON array: its elements)."""
    kind, compression, _ = file_format(path)
    if kind == "sniff" or kind == "json":
        first = _first_char(path, compression)
        kind = "json_array" if first == "[" else "jsonl" if first in ("{", "") else None
        if kind is None:
            raise InputError(f"{path}: neither JSON lines nor a JSON array (it starts with {first!r})")
    if kind == "jsonl":
        with open_raw(path, compression) as fh:
            yield from _json_records(fh)
        return
    if kind == "json_array":
        with open_raw(path, compression) as fh:
            try:
                items = json.load(fh)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{path}: not a JSON array: {exc}") from exc
        for i, item in enumerate(items, start=1):
            yield (i, item, None) if isinstance(item, dict) else (i, None, "a JSON object was expected")
        return
    import pandas as pd

    try:
        if kind in ("csv", "tsv"):
            sep = _delimiter(path, compression, kind)
            with open_raw(path, compression) as fh:
                chunks = pd.read_csv(fh, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8",
                                     chunksize=50_000)
                row = 2
                for frame in chunks:
                    for record in frame.to_dict(orient="records"):
                        yield row, record, None
                        row += 1
            return
        with open_raw(path, compression) as fh:
            import pyarrow.parquet as pq

            source = fh if compression is None else io.BytesIO(fh.read())
            row = 1
            for batch in pq.ParquetFile(source).iter_batches(batch_size=50_000):
                for record in batch.to_pylist():
                    yield row, record, None
                    row += 1
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.EmptyDataError:
        return
    except InputError:
        raise
    except Exception as exc:  # pyarrow/pandas parse errors carry no common base class
        raise InputError(f"{path}: cannot be read as {kind}: {exc}") from exc


def _read_checked(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``read_records``, with a damaged compressed stream or an I/O error stopping the stage with the file's name."""
    try:
        yield from read_records(path)
    except InputError:
        raise
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("zstandard"):
            raise InputError(f"{path}: cannot be read: {exc}") from exc
        raise


def ingest(raw_dir: Path, cfg: Ingest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fields = cfg.text_fields
    placeholders = {p.lower() for p in cfg.placeholders}
    policy = cfg.on_bad_row
    max_chars = cfg.max_chars
    every = sorted(p for p in raw_dir.rglob("*") if p.is_file())
    not_read = {p.relative_to(raw_dir).as_posix(): why for p in every for why in [file_format(p)[2]] if why}
    files = [p for p in every if p.relative_to(raw_dir).as_posix() not in not_read]
    for name, why in not_read.items():
        log.info("not read: %s: %s", name, why)
    if not files:
        raise InputError(f"{raw_dir}: no input files ({', '.join(SUFFIXES)}, optionally compressed "
                         f"{', '.join(COMPRESSIONS)}); not read: {not_read or 'none'}")
    counts: Counter[str] = Counter()
    problems: list[str] = []
    posts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in files:
        rel = path.relative_to(raw_dir).as_posix()
        n_file = 0
        for row, record, problem in _read_checked(path):
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
        "not_read": not_read,
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

