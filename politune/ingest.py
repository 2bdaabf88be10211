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
import hashlib
import html
import io
import json
import logging
import lzma
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from politune.common import InputError, atomic_path, write_json
from politune.schema import FIELDS, PRESETS, Ingest, Params, Source

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


# Where a post's fields are when no source entry says otherwise (the common dumps' names).
DEFAULT_FIELDS = {"id": ["id"], "created": ["created_utc", "created_at", "created"], "author": ["author"],
                  "subreddit": ["subreddit"], "language": ["language", "lang"], "drop_if_true": []}
TRUE = {"true", "t", "1", "yes", "y"}


def field_map(source: Source | None, text_fields: list[str]) -> dict[str, list[str]]:
    """The field lists of a source: the defaults (text: ``ingest.text_fields``), then its preset, then its own."""
    fields = {"text": list(text_fields), **DEFAULT_FIELDS}
    if source is not None:
        fields.update(PRESETS.get(source.preset, {}) if source.preset else {})
        fields.update({k: v for k in FIELDS if (v := getattr(source, k)) is not None})
    return fields


def first(record: dict[str, Any], names: list[str]) -> tuple[str | None, Any]:
    """(field, value) of the first of ``names`` the record has with a value, or (None, None)."""
    for name in names:
        value = record.get(name)
        if value is not None and value != "":
            return name, value
    return None, None


def post_time(value: Any) -> datetime:
    """A post's time: epoch seconds (Reddit's ``created_utc``, as a number or digits) or an ISO 8601 date-time (Truth
    Social's ``timestamp``); naive times are UTC. ``ValueError`` when it is neither."""
    if isinstance(value, bool):
        raise TypeError(f"not a time: {value!r}")
    if isinstance(value, int | float) or (isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip())):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if isinstance(value, datetime):
        parsed = value
    else:
        parsed = datetime.fromisoformat(str(value).strip())
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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


COLUMNS = ("id", "source", "text", "label", "subreddit", "created")
FILTERS = ("flag", "author", "subreddit", "language", "date", "short")


class Seen:
    """Membership of texts (or ids) by a 64-bit BLAKE2b digest, never the text: recent digests in a set, older ones
    merged every ``merge_at`` into one sorted ``uint64`` array (8 bytes a post). A chance collision among 10 million
    posts: about 3 in a million."""

    def __init__(self, merge_at: int = 1 << 16) -> None:
        self.merge_at = merge_at
        self.recent: set[int] = set()
        self.merged = np.zeros(0, dtype=np.uint64)

    def add(self, value: str) -> bool:
        """Add ``value``; False when it was there already."""
        digest = int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")
        if digest in self.recent:
            return False
        if len(self.merged):
            key = np.uint64(digest)
            at = int(np.searchsorted(self.merged, key))
            if at < len(self.merged) and self.merged[at] == key:
                return False
        self.recent.add(digest)
        if len(self.recent) >= self.merge_at:
            # None of the recent digests is in the merged array: insert them at their sorted places (one new array,
            # where np.union1d would sort a concatenated copy).
            fresh = np.sort(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.merged = np.insert(self.merged, np.searchsorted(self.merged, fresh), fresh)
            self.recent = set()
        return True


class Reservoir:
    """A seeded uniform random sample of ``size`` posts from a stream (Algorithm R), returned in stream order."""

    def __init__(self, size: int, seed: str) -> None:
        self.size, self.rng, self.seen, self.items = size, random.Random(seed), 0, []

    def offer(self, post: dict[str, Any]) -> None:
        if self.seen < self.size:
            self.items.append((self.seen, post))
        else:
            slot = self.rng.randrange(self.seen + 1)
            if slot < self.size:
                self.items[slot] = (self.seen, post)
        self.seen += 1

    def posts(self) -> list[dict[str, Any]]:
        return [post for _, post in sorted(self.items, key=lambda item: item[0])]


def source_of(rel: str, sources: list[Source]) -> int | None:
    """The index of the first ``ingest.sources`` entry whose glob matches the file's path under the raw folder."""
    return next((i for i, s in enumerate(sources) if PurePosixPath(rel).match(s.match)), None)


def raw_files(raw_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The data files under ``raw_dir`` (sorted) and the others, each with why it is not read."""
    every = sorted(p for p in raw_dir.rglob("*") if p.is_file())
    not_read = {p.relative_to(raw_dir).as_posix(): why for p in every for why in [file_format(p)[2]] if why}
    for name, why in not_read.items():
        log.info("not read: %s: %s", name, why)
    files = [p for p in every if p.relative_to(raw_dir).as_posix() not in not_read]
    if not files:
        raise InputError(f"{raw_dir}: no input files ({', '.join(SUFFIXES)}, optionally compressed "
                         f"{', '.join(COMPRESSIONS)}); not read: {not_read or 'none'}")
    return files, not_read


class Ingestion:
    """Read every raw file, one row at a time, and yield its posts (``posts()``); the counts for
    the stage report accumulate as it goes (``report()``). Memory holds one row, the digests of the texts
    and ids seen, and the posts of a sampled source's reservoir, never the corpus."""

    def __init__(self, raw_dir: Path, cfg: Ingest) -> None:
        self.raw_dir, self.cfg = raw_dir, cfg
        self.files, self.not_read = raw_files(raw_dir)
        self.counts: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.per_file: dict[str, dict[str, int]] = {}
        self.sampled: dict[str, dict[str, int]] = {}
        self.problems: list[str] = []
        self.texts, self.ids = Seen(), Seen()
        self.placeholders = {p.lower() for p in cfg.placeholders}
        f = cfg.filters
        self.allow = {x.lower() for x in f.subreddits}
        self.deny = {x.lower() for x in f.exclude_subreddits}
        self.languages = {x.lower() for x in f.languages}
        self.authors = set(f.exclude_authors)

    def bad_row(self, path: Path, row: int, problem: str) -> None:
        message = f"{path}:{row}: {problem}"
        if self.cfg.on_bad_row == "fail":
            raise InputError(message + " (set ingest.on_bad_row: skip to skip such rows)")
        self.counts["bad_row"] += 1
        if len(self.problems) < 50:
            self.problems.append(message)
        log.warning("skipping %s", message)

    def keep(self, record: dict[str, Any], fields: dict[str, list[str]]) -> str | None:
        """The filter that drops the record (a ``FILTERS`` name), or None; ``ValueError`` names a field whose value
        a filter cannot read."""
        for name in fields["drop_if_true"]:
            value = record.get(name)
            if value is True or (isinstance(value, str) and value.strip().lower() in TRUE) or \
                    (isinstance(value, int | float) and not isinstance(value, bool) and value == 1):
                return "flag"
        if self.authors:
            _, author = first(record, fields["author"])
            if author is not None and str(author) in self.authors:
                return "author"
        if self.allow or self.deny:
            _, sub = first(record, fields["subreddit"])
            if sub is not None and ((self.allow and str(sub).lower() not in self.allow) or
                                    str(sub).lower() in self.deny):
                return "subreddit"
        if self.languages:
            _, lang = first(record, fields["language"])
            if lang is not None and str(lang).lower() not in self.languages:
                return "language"
        f = self.cfg.filters
        if f.date_from or f.date_to:
            name, value = first(record, fields["created"])
            if value is not None:
                try:
                    day = post_time(value).date()
                except (ValueError, TypeError, OverflowError, OSError) as exc:
                    raise ValueError(f"field {name}: not a time ({value!r})") from exc
                if (f.date_from and day < f.date_from) or (f.date_to and day > f.date_to):
                    return "date"
        return None

    def post(self, path: Path, rel: str, row: int, record: dict[str, Any] | None, problem: str | None,
             fields: dict[str, list[str]]) -> dict[str, Any] | None:
        """The post of one row, or None (counted) when the row is dropped."""
        if problem is None:
            try:
                dropped = self.keep(record, fields)
            except ValueError as exc:
                dropped, problem = None, str(exc)
            if dropped:
                self.filtered[dropped] += 1
                return None
        if problem is None:
            text = extract_text(record, fields["text"])
            if text is None:
                problem = f"no text field (expected one of {', '.join(fields['text'])} or title+selftext)"
        if problem is not None:
            self.bad_row(path, row, problem)
            return None
        if text.strip().lower() in self.placeholders:
            self.counts["placeholder"] += 1
            return None
        text = clean_text(text)
        if not text:
            self.counts["empty"] += 1
            return None
        if len(text) < self.cfg.filters.min_chars:
            self.filtered["short"] += 1
            return None
        if len(text) > self.cfg.max_chars:
            self.counts["truncated"] += 1
            text = text[: self.cfg.max_chars].rsplit(" ", 1)[0]
        if not self.texts.add(text):
            self.counts["duplicate"] += 1
            return None
        _, post_id = first(record, fields["id"])
        label = record.get("label")
        _, sub = first(record, fields["subreddit"])
        _, created = first(record, fields["created"])
        return {"id": str(post_id) if post_id is not None else f"{rel}:{row}", "source": rel, "text": text,
                "label": str(label) if label not in (None, "") else None,
                "subreddit": str(sub) if sub else None, "created": str(created) if created is not None else None}

    def unique_id(self, post: dict[str, Any]) -> dict[str, Any]:
        """Ids are unique downstream: a repeat of an id already written is qualified with its source."""
        if not self.ids.add(post["id"]):
            base = f"{post['source']}:{post['id']}"
            post["id"], k = base, 1
            while not self.ids.add(post["id"]):
                k += 1
                post["id"] = f"{base}#{k}"
        return post

    def emit(self, post: dict[str, Any]) -> dict[str, Any]:
        self.counts["posts_out"] += 1
        self.labels[post["label"] or "none"] += 1
        return self.unique_id(post)

    def posts(self) -> Iterator[dict[str, Any]]:
        """Every post, in file order; a sampled source's posts after the others, in its files' order."""
        cfg = self.cfg
        reservoirs = {i: Reservoir(s.sample, f"{cfg.sample_seed}:{s.match}") for i, s in enumerate(cfg.sources)
                      if s.sample}
        for path in self.files:
            rel = path.relative_to(self.raw_dir).as_posix()
            index = source_of(rel, cfg.sources)
            fields = field_map(cfg.sources[index] if index is not None else None, cfg.text_fields)
            rows = kept = 0
            for row, record, problem in _read_checked(path):
                rows += 1
                post = self.post(path, rel, row, record, problem, fields)
                if post is None:
                    continue
                kept += 1
                if index in reservoirs:
                    reservoirs[index].offer(post)
                else:
                    yield self.emit(post)
            self.counts["rows_read"] += rows
            self.per_file[rel] = {"rows": rows, "posts": kept}
            if rows == 0:
                self.counts["empty_files"] += 1
                self.problems.append(f"{path}: empty file")
        for index, reservoir in reservoirs.items():
            sample = reservoir.posts()
            self.sampled[cfg.sources[index].match] = {"posts": reservoir.seen, "sampled": len(sample)}
            self.counts["sampled_out"] += reservoir.seen - len(sample)
            for post in sample:
                yield self.emit(post)

    def report(self) -> dict[str, Any]:
        c = self.counts
        return {
            "files": len(self.files),
            "not_read": self.not_read,
            "rows_read": c["rows_read"],
            "posts_out": c["posts_out"],
            "skipped": {k: c[k] for k in ("bad_row", "placeholder", "empty", "duplicate")},
            "filtered": {k: self.filtered[k] for k in FILTERS},
            "sampled": self.sampled,
            "truncated": c["truncated"],
            "empty_files": c["empty_files"],
            "labels": dict(sorted(self.labels.items())),
            "per_file": self.per_file,
            "problems": self.problems,
        }


def ingest(raw_dir: Path, cfg: Ingest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every post in memory, and the report (for a small corpus and tests; the stage streams: ``write_posts``)."""
    reader = Ingestion(raw_dir, cfg)
    posts = list(reader.posts())
    return posts, reader.report()


def write_posts(raw_dir: Path, cfg: Ingest, out: Path) -> dict[str, Any]:
    """Stream the posts into the Parquet table ``out``, ``ingest.chunk_rows`` at a time (a row group each), and
    return the report. ``out`` appears only when every file was read and at least one post came out."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = Ingestion(raw_dir, cfg)
    # pandas' own schema of a table of strings (large_string, with its metadata), as DataFrame.to_parquet writes it
    schema = pa.Table.from_pandas(pd.DataFrame({c: ["x"] for c in COLUMNS}), preserve_index=False).schema
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            chunk: list[dict[str, Any]] = []
            for post in reader.posts():
                chunk.append(post)
                if len(chunk) >= cfg.chunk_rows:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    chunk = []
            if chunk:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        report = reader.report()
        if not report["posts_out"]:
            raise InputError(f"{raw_dir}: no usable post after cleaning ({report['skipped']}, filtered "
                             f"{report['filtered']}); add posts to the folder or loosen ingest.filters")
    return report


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    from politune.tracking import log_metrics, stage_run

    with stage_run("ingest", params, params_file) as mlflow:
        report = write_posts(Path(paths.raw), params.ingest, Path(paths.out))
        write_json(paths.report, report)
        log_metrics(mlflow, {k: v for k, v in report.items() if k not in ("problems", "per_file", "sampled")})
    log.info("ingested %d posts from %d rows", report["posts_out"], report["rows_read"])
