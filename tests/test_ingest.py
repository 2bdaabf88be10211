import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from politune.common import InputError
from politune.ingest import clean_text, extract_text, ingest
from tests.helpers import PARAMS, ROOT, section

CFG = section("ingest")


def test_clean_text_strips_html_urls_and_control_characters():
    raw = '<p>Lower&nbsp;taxes &amp; less spending!</p><p><a href="https://x.org/a">https://x.org/a</a> see www.y.com\x07</p>'
    assert clean_text(raw) == "Lower taxes & less spending! see"


def test_extract_text_field_conventions():
    fields = CFG.text_fields
    assert extract_text({"body": "a comment"}, fields) == "a comment"
    assert extract_text({"title": "Title.", "selftext": "Body"}, fields) == "Title. Body"
    assert extract_text({"title": "Only title", "selftext": "[removed]"}, fields) == "Only title"
    assert extract_text({"content": "<p>x</p>"}, fields) == "<p>x</p>"
    assert extract_text({"other": 1}, fields) is None


def test_shipped_corpus_is_accounted_for():
    posts, report = ingest(ROOT / "data" / "raw", CFG)
    assert report["posts_out"] == len(posts) >= 300
    assert report["rows_read"] == report["posts_out"] + sum(report["skipped"].values())
    assert report["skipped"]["placeholder"] >= 1 and report["skipped"]["duplicate"] >= 1
    assert set(report["labels"]) == {"right", "left", "off"}
    assert len({p["id"] for p in posts}) == len(posts)
    assert all("<" not in p["text"] and "http" not in p["text"] for p in posts)
    reddit = [p for p in posts if p["source"] == "reddit_style.jsonl"]
    assert reddit and all(p["subreddit"] and p["created"] for p in reddit)


def write(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_bad_rows_are_skipped_and_reported_with_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "a.jsonl", '{"text": "fine post"}\n{"text": broken\n{"nothing": 1}\n[1, 2]\n')
    write(raw / "b.jsonl", b'{"text": "caf\xe9"}\n{"text": "second"}\n')
    write(raw / "c.csv", "")
    posts, report = ingest(raw, section("ingest", on_bad_row="skip"))
    assert [p["text"] for p in posts] == ["fine post", "second"]
    assert report["skipped"]["bad_row"] == 4
    problems = "\n".join(report["problems"])
    assert f"{raw / 'a.jsonl'}:2: invalid JSON" in problems
    assert f"{raw / 'a.jsonl'}:3: no text field" in problems
    assert f"{raw / 'b.jsonl'}:1: not UTF-8" in problems
    assert report["empty_files"] == 1


def test_on_bad_row_fail_names_file_line_and_field(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "posts.jsonl", '{"text": "ok"}\n{"title_only": "x"}\n')
    with pytest.raises(InputError, match=r"posts\.jsonl:2: no text field"):
        ingest(raw, section("ingest", on_bad_row="fail"))


def test_enormous_posts_are_truncated(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "big.jsonl", json.dumps({"text": "word " * 5000}) + "\n")
    posts, report = ingest(raw, section("ingest", max_chars=100))
    assert len(posts[0]["text"]) <= 100 and report["truncated"] == 1


def test_parquet_and_csv_inputs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"id": ["p1", "p2"], "body": ["from parquet", "from parquet"]}).to_parquet(raw / "x.parquet")
    write(raw / "y.csv", "id,text\nc1,from csv\n")
    posts, report = ingest(raw, CFG)
    assert sorted(p["text"] for p in posts) == ["from csv", "from parquet"]
    assert report["skipped"]["duplicate"] == 1


def test_stage_fails_clearly_and_keeps_previous_output(tmp_path):
    raw = write(tmp_path / "raw" / "empty.jsonl", "\n").parent
    out = write(tmp_path / "posts.parquet", "previous output")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": PARAMS["ingest"]}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "stages.ingest", "--params", str(params), "--raw", str(raw),
                           "--out", str(out), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "no usable post" in proc.stderr
    assert out.read_text(encoding="utf-8") == "previous output"


def test_invalid_policy_is_a_params_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": dict(PARAMS["ingest"], on_bad_row="ignore")}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "stages.ingest", "--params", str(params), "--raw", "data/raw",
                           "--out", str(tmp_path / "o.parquet"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "ingest.on_bad_row" in proc.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_the_paper_corpora_formats_are_all_read(tmp_path):
    """Truth Social's truths.tsv, a Politosphere comments_YYYY-MM.bz2 (JSON lines, no format in its name), JSON lines
    compressed with zstd and gzip, a .json array, an xz-compressed CSV and a semicolon CSV: every row is read; a file
    that is not data is named in the report; a damaged compressed file stops the stage with its name."""
    import bz2
    import gzip
    import lzma

    import zstandard

    raw = tmp_path / "raw"
    truths = pd.DataFrame({"id": ["t1", "t2"], "timestamp": ["2022-02-21", "2022-02-22"], "is_retruth": ["f", "t"],
                           "is_reply": ["f", "f"], "author": ["a1", "a2"],
                           "text": ["Cut taxes; free markets, now.", "Secure the border\tnow"]})
    write(raw / "truths.tsv", truths.to_csv(sep="\t", index=False))
    comments = [{"id": f"r{i}", "body": f"Medicare for all, comment {i}", "subreddit": "politics",
                 "created_utc": 1546300800 + i, "author": "u", "language": "en"} for i in range(3)]
    lines = "".join(json.dumps(c) + "\n" for c in comments).encode()
    write(raw / "comments_2019-01.bz2", bz2.compress(lines))
    write(raw / "RC_2019-02.zst", zstandard.ZstdCompressor().compress(lines.replace(b'"r', b'"z')
                                                                      .replace(b"comment", b"zst comment")))
    write(raw / "more.jsonl.gz", gzip.compress(lines.replace(b'"r', b'"g')))  # the same texts as the .bz2's
    write(raw / "array.json", json.dumps([{"id": "j1", "text": "an array post"}, {"id": "j2", "text": "another"}]))
    write(raw / "forum.csv.xz", lzma.compress("id,text\nx1,\"from xz, with a comma\"\n".encode()))
    write(raw / "semi.csv", "id;text\ns1;semicolon separated, post\ns2;second one\n")
    write(raw / "notes.txt", "not data")
    posts, report = ingest(raw, CFG)
    assert report["files"] == 7 and report["not_read"] == {"notes.txt": report["not_read"]["notes.txt"]}
    assert "not a data file" in report["not_read"]["notes.txt"]
    assert report["rows_read"] == 2 + 3 + 3 + 3 + 2 + 1 + 2
    texts = {p["text"] for p in posts}
    assert {"Cut taxes; free markets, now.", "an array post", "from xz, with a comma", "semicolon separated, post",
            "Medicare for all, zst comment 2", "Medicare for all, comment 0"} <= texts
    assert report["skipped"]["duplicate"] == 3  # the .gz comments repeat the .bz2 ones' text
    politosphere = [p for p in posts if p["source"] == "comments_2019-01.bz2"]
    assert len(politosphere) == 3 and all(p["subreddit"] == "politics" and p["created"] for p in politosphere)

    write(raw / "broken.jsonl.gz", gzip.compress(lines)[:-12])  # cut short: the stream ends early
    with pytest.raises(InputError, match=r"broken\.jsonl\.gz: cannot be read"):
        ingest(raw, CFG)


def test_csv_delimiter_is_sniffed_and_a_folder_without_data_names_what_it_holds(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "pipe.csv", "id|text\np1|a pipe, separated post\np2|another, with commas, in it\n")
    posts, _ = ingest(raw, CFG)
    assert [p["text"] for p in posts] == ["a pipe, separated post", "another, with commas, in it"]
    with pytest.raises(InputError, match="no input files.*not read"):
        ingest(write(tmp_path / "other" / "README.md", "x").parent, CFG)


def test_paper_presets_and_researcher_filters(tmp_path):
    """truths.tsv through the truth_social preset (retruths dropped), a Politosphere dump through the politosphere
    preset; subreddit, language, author, date and length filters; every dropped row counted by its filter."""
    import bz2

    from politune.ingest import write_posts

    raw = tmp_path / "raw"
    truths = pd.DataFrame({"id": ["t1", "t2", "t3"], "timestamp": ["2019-01-05 10:00:00", "2019-01-06 11:00:00",
                                                                  "2018-12-31 23:00:00"],
                           "is_retruth": ["f", "t", "f"], "is_reply": ["f", "f", "f"], "author": ["a", "b", "c"],
                           "text": ["Lower taxes for every family.", "A retruth of someone else.",
                                    "Too early for the date range."]})
    write(raw / "truths.tsv", truths.to_csv(sep="\t", index=False))
    rows = [("politics", "en", "alice", 1546400000, "Medicare for all would save lives."),
            ("Conservative", "en", "bob", 1546400001, "Secure the border and cut spending."),
            ("aww", "en", "carol", 1546400002, "Look at my cat, politics-free."),
            ("politics", "de", "dora", 1546400003, "Ein deutscher Kommentar zur Politik."),
            ("politics", "en", "AutoModerator", 1546400004, "Your comment was removed by a bot."),
            ("politics", "en", "erin", 1546400005, "Too short"),
            ("politics", "en", "finn", 1549000000, "Posted in February, after the range.")]
    lines = "".join(json.dumps({"id": f"c{i}", "subreddit": s, "language": lang, "author": a, "created_utc": t,
                                "body": b}) + "\n" for i, (s, lang, a, t, b) in enumerate(rows))
    write(raw / "comments_2019-01.bz2", bz2.compress(lines.encode()))
    cfg = section("ingest", sources=[{"match": "truths.tsv", "preset": "truth_social"},
                                     {"match": "comments_*", "preset": "politosphere"}],
                  filters={"subreddits": ["Politics", "conservative"], "exclude_subreddits": [],
                           "languages": ["en"], "date_from": "2019-01-01", "date_to": "2019-01-31",
                           "exclude_authors": ["AutoModerator", "[deleted]"], "min_chars": 12})
    report = write_posts(raw, cfg, tmp_path / "posts.parquet")
    posts = pd.read_parquet(tmp_path / "posts.parquet")
    assert posts["text"].tolist() == ["Medicare for all would save lives.", "Secure the border and cut spending.",
                                      "Lower taxes for every family."]
    assert posts["created"].tolist() == ["1546400000", "1546400001", "2019-01-05 10:00:00"]
    assert report["filtered"] == {"flag": 1, "author": 1, "subreddit": 1, "language": 1, "date": 2, "short": 1}
    assert report["per_file"] == {"comments_2019-01.bz2": {"rows": 7, "posts": 2}, "truths.tsv": {"rows": 3, "posts": 1}}
    assert report["rows_read"] == report["posts_out"] + sum(report["skipped"].values()) + sum(report["filtered"].values())

    # A time that a date filter cannot read is a bad row named by file, row and field.
    write(raw / "odd.jsonl", '{"id": "o1", "text": "An undated post about taxes.", "created_at": "yesterday"}\n')
    with pytest.raises(InputError, match=r"odd\.jsonl:1: field created_at: not a time \('yesterday'\)"):
        write_posts(raw, cfg.model_copy(update={"on_bad_row": "fail"}), tmp_path / "other.parquet")
    assert not (tmp_path / "other.parquet").exists()


def test_a_source_sample_is_seeded_and_the_table_is_written_in_chunks(tmp_path):
    from politune.ingest import write_posts

    raw = tmp_path / "raw"
    write(raw / "big.jsonl", "".join(json.dumps({"id": f"p{i}", "text": f"post number {i}"}) + "\n" for i in range(60)))
    write(raw / "small.jsonl", '{"id": "p1", "text": "a post whose id repeats one in big.jsonl"}\n')
    sampled = section("ingest", sources=[{"match": "big.jsonl", "sample": 10}], chunk_rows=4)
    report = write_posts(raw, sampled, tmp_path / "a.parquet")
    a = pd.read_parquet(tmp_path / "a.parquet")
    assert len(a) == 11 and report["sampled"] == {"big.jsonl": {"posts": 60, "sampled": 10}}
    assert a["id"].is_unique
    numbers = [int(t.split()[-1]) for t in a["text"] if t.startswith("post number")]
    assert numbers == sorted(numbers) and len(set(numbers)) == 10  # a sample, in file order
    write_posts(raw, sampled, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()  # seeded
    other = write_posts(raw, sampled.model_copy(update={"sample_seed": 1}), tmp_path / "c.parquet")
    assert other["posts_out"] == 11 and not pd.read_parquet(tmp_path / "c.parquet").equals(a)

    import pyarrow.parquet as pq

    whole = section("ingest", chunk_rows=1000)
    write_posts(raw, whole, tmp_path / "whole.parquet")
    write_posts(raw, whole.model_copy(update={"chunk_rows": 7}), tmp_path / "chunks.parquet")
    assert pq.ParquetFile(tmp_path / "chunks.parquet").num_row_groups == 9
    assert pd.read_parquet(tmp_path / "chunks.parquet").equals(pd.read_parquet(tmp_path / "whole.parquet"))
    ids = pd.read_parquet(tmp_path / "whole.parquet")["id"].tolist()
    assert ids[1] == "p1" and ids[-1] == "small.jsonl:p1"  # a repeated id is qualified with its source


def test_the_stage_writes_the_shipped_table_as_pandas_would(tmp_path):
    """Streaming changes nothing for the shipped corpus: the same bytes as one DataFrame.to_parquet."""
    from politune.ingest import write_posts

    write_posts(ROOT / "data" / "raw", CFG, tmp_path / "posts.parquet")
    posts, _ = ingest(ROOT / "data" / "raw", CFG)
    pd.DataFrame(posts).to_parquet(tmp_path / "pandas.parquet", index=False)
    assert (tmp_path / "posts.parquet").read_bytes() == (tmp_path / "pandas.parquet").read_bytes()
