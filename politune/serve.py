"""Run ``vllm serve`` (vLLM's OpenAI-compatible server) on loopback for as long as a stage needs it.

The judge talks to any OpenAI-compatible endpoint; by default that endpoint is a local server of the annotator model
that the stage starts here and stops when it is done (also when it fails). Engine options come from params and are
passed to the server's command line as they are (``max_model_len: 2048`` -> ``--max-model-len 2048``; ``true`` ->
a bare flag), so a GPU setup (``tensor_parallel_size``...) is a params change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from politune.common import EndpointError, resolve_dtype

log = logging.getLogger("politune.serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KVCACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE when a params section does not set cpu_kvcache_space_gib
# params keys that are vLLM environment variables rather than engine arguments
ENV_KEYS = {"cpu_kvcache_space_gib": "VLLM_CPU_KVCACHE_SPACE", "multiprocessing": "VLLM_ENABLE_V1_MULTIPROCESSING",
            "omp_num_threads": "OMP_NUM_THREADS", "cpu_omp_threads_bind": "VLLM_CPU_OMP_THREADS_BIND",
            "cpu_reserved_cpus": "VLLM_CPU_NUM_OF_RESERVED_CPU"}


def engine_options(engine: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """A params engine section (``annotate.engine``, ``judge.serve``) -> (environment, vLLM engine arguments).

    The one mapping used by the offline engine and by ``vllm serve``: ``cpu_kvcache_space_gib`` becomes
    ``VLLM_CPU_KVCACHE_SPACE`` (ignored on GPUs), ``multiprocessing`` becomes ``VLLM_ENABLE_V1_MULTIPROCESSING``
    (false: the offline engine's core runs in the stage's process; ``vllm serve`` keeps its engine core in a process
    of its own, but on CPU the model then runs in that process instead of a third one), ``omp_num_threads``,
    ``cpu_omp_threads_bind`` and ``cpu_reserved_cpus`` become ``OMP_NUM_THREADS``, ``VLLM_CPU_OMP_THREADS_BIND`` and
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (null: vLLM's own CPU thread set-up; bench.run times them),
    ``dtype: auto`` becomes bfloat16 where bf16 is native and float32 elsewhere (``politune.common.resolve_dtype``);
    every other key is passed to vLLM as it is.
    """
    values = {"cpu_kvcache_space_gib": KVCACHE_GIB, **{k: v for k, v in engine.items() if v is not None}}
    env = {ENV_KEYS[k]: str(int(v) if isinstance(v, bool) else v) for k, v in values.items() if k in ENV_KEYS}
    options = {k: v for k, v in engine.items() if k not in ENV_KEYS}
    if "dtype" in options:
        options["dtype"] = resolve_dtype(options["dtype"])
    return env, options


def engine_args(engine: dict[str, Any]) -> list[str]:
    """``{max_model_len: 2048, enforce_eager: true, enable_chunked_prefill: false}`` -> ``--max-model-len 2048
    --enforce-eager --no-enable-chunked-prefill`` (vLLM's boolean config flags all have a ``--no-`` form); a list
    gives the flag its values (``lora_modules: [a=x, b=y]`` -> ``--lora-modules a=x b=y``), a mapping its JSON
    (``structured_outputs_config: {backend: guidance}`` -> ``--structured-outputs-config '{"backend": "guidance"}'``);
    null is left out (vLLM's default)."""
    args: list[str] = []
    for key, value in engine_options(engine)[1].items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list | tuple):
            args += [flag, *map(str, value)]
        elif isinstance(value, dict):  # a config of its own (structured_outputs_config): JSON, as vLLM's CLI reads it
            args += [flag, json.dumps(value)]
        else:
            args += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return args


def server_command(model: str | Path, port: int, engine: dict[str, Any], seed: int) -> list[str]:
    # `python -m ...api_server` rather than the `vllm` CLI: the CLI looks up the version of a distribution named
    # "vllm", and the CPU build is distributed as "vllm-cpu".
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--seed", str(seed), *engine_args(engine)]


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its engine workers (a process group of their own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(model: str | Path, engine: dict[str, Any], seed: int, log_path: str | Path,
          startup_timeout: float = 300.0) -> tuple[str, subprocess.Popen]:
    """Start a server on a free loopback port and wait until ``/health`` answers; return (base_url, process)."""
    port = free_port()
    log_path = Path(log_path)
    # unbuffered: vLLM logs to stdout, and a server stopped by a signal would lose the log's buffered tail
    env = dict(os.environ, PYTHONUNBUFFERED="1", **engine_options(engine)[0])
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(server_command(model, port, engine, seed), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise EndpointError(f"vllm serve {model} exited with {proc.returncode} before it was ready; "
                                f"its log:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return f"http://127.0.0.1:{port}/v1", proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise EndpointError(f"vllm serve {model} was not ready after {startup_timeout:.0f} s; "
                                f"its log:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(1)


@contextlib.contextmanager
def serving(model: str | Path, engine: dict[str, Any], seed: int, startup_timeout: float = 300.0,
            log_path: str | Path | None = None) -> Iterator[str]:
    """Context manager: a local ``vllm serve`` of ``model``; yields its base URL and always stops it. The server's
    log goes to ``log_path`` (default: a temporary file, shown in the error if the server fails to start)."""
    with tempfile.TemporaryDirectory(prefix="politune-serve-") as tmp:
        started = time.monotonic()
        url, proc = start(model, engine, seed, log_path or Path(tmp) / "serve.log", startup_timeout)
        log.info("vllm serve %s ready at %s after %.0f s", model, url, time.monotonic() - started)
        try:
            yield url
        finally:
            stop(proc)
