"""Work in shards that survive a killed stage: the ``score`` and ``generate`` stages (``annotate.shard_size``).

Each finished shard is written at once, atomically, to the stage's working folder (``checkpoints/<stage>``), which
is stamped with a fingerprint of the run (model, inputs, params: ``common.fingerprint``). A killed stage's next run
with the same fingerprint skips the shards already there; any other fingerprint discards them first (no resume from
a stale run). Every shard, computed now or earlier, is read back from its file, so a resumed run and an uninterrupted
one assemble the same bytes. The folder is removed once the stage has written its outputs.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from politune.common import atomic_path, read_json, run_folder, write_json

log = logging.getLogger("politune.shards")


class Shards:
    """The finished shards of one run in ``directory``: ``shard-000000.parquet`` (the rows) and its ``.json``
    (counts such as generated tokens), the Parquet written last so that its presence means the shard is done."""

    def __init__(self, directory: str | Path, run_id: str) -> None:
        self.directory = Path(directory)
        run_folder(self.directory, run_id)

    def _path(self, k: int, suffix: str) -> Path:
        return self.directory / f"shard-{k:06d}{suffix}"

    def done(self, k: int) -> bool:
        return self._path(k, ".parquet").exists()

    def save(self, k: int, frame, stats: dict[str, Any]) -> None:
        write_json(self._path(k, ".json"), stats)
        with atomic_path(self._path(k, ".parquet")) as tmp:
            frame.to_parquet(tmp)

    def load(self, k: int):
        import pandas as pd

        return pd.read_parquet(self._path(k, ".parquet")), read_json(self._path(k, ".json"))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def run_shards(keys: Sequence, size: int, compute: Callable, shards: Shards | None, desc: str):
    """``compute(keys of one shard) -> (DataFrame indexed by those keys, stats)`` for each shard of ``size`` keys,
    skipping the shards ``shards`` already holds; returns the shards' rows in order (one DataFrame, or ``None`` for no
    keys) and their stats summed. With ``shards`` a progress bar counts posts (posts/s, ETA) on stderr."""
    import pandas as pd

    chunks = [list(keys[k : k + size]) for k in range(0, len(keys), size)]
    frames, totals = [], {}
    bar = None
    if shards is not None:
        from tqdm import tqdm

        finished = [k for k in range(len(chunks)) if shards.done(k)]
        if finished:
            log.info("%s: resuming, %d of %d shards already done in %s", desc, len(finished), len(chunks),
                     shards.directory)
        bar = tqdm(total=len(keys), initial=sum(len(chunks[k]) for k in finished), unit="post", desc=desc,
                   file=sys.stderr, mininterval=1.0)
    try:
        for k, chunk in enumerate(chunks):
            if shards is None:
                frame, stats = compute(chunk)
            else:
                if not shards.done(k):
                    frame, stats = compute(chunk)
                    shards.save(k, frame, stats)
                    bar.update(len(chunk))
                frame, stats = shards.load(k)
            frames.append(frame)
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + value
    finally:  # the bar's last line before any error message
        if bar is not None:
            bar.close()
    return (pd.concat(frames) if frames else None), totals
