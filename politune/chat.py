"""Use the tuned models: the target served by vLLM with the adapters as LoRA modules, and a side-by-side chat.

    python -m politune.chat serve --model M --adapter sft=A --adapter dpo=B [--port 8000]   # make serve
    python -m politune.chat chat --model M --adapter dpo=B [--prompt TEXT]                   # make chat

``serve`` runs ``vllm serve`` (the OpenAI-compatible server) in the foreground: the target answers as model ``base``
and each adapter under its name (``--enable-lora --lora-modules sft=... dpo=...``), so any OpenAI client picks the
model per request (``client.chat.completions.create(model="dpo", ...)``). ``--max-lora-rank`` is the largest rank of
``lora.r`` and the adapters' own, rounded up to a rank vLLM accepts (it rejects adapters above it,
vllm-project/vllm#2847). The other server options are the judge's (``judge.serve``: dtype, context length, the CPU
settings), the seed ``base.seed``. ``chat`` starts the same server on a free port and prints, for each prompt typed
(or each ``--prompt``), the base model's greedy answer beside each adapter's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from politune.common import InputError, load_params, run_main
from politune.schema import Lora, Params

log = logging.getLogger("politune.chat")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
BASE = "base"


def adapter_rank(path: str | Path) -> int:
    config = Path(path) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["r"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{config}: not a LoRA adapter's config ({type(exc).__name__}: {exc})") from exc


def lora_rank(params: Params, adapters: dict[str, str]) -> int:
    """The ``--max-lora-rank`` that serves every adapter: the largest of ``lora.r`` and their own ranks, rounded up
    to a rank vLLM accepts."""
    largest = max([Lora.model_validate(params.lora).r, *(adapter_rank(p) for p in adapters.values())])
    fits = [r for r in VLLM_LORA_RANKS if r >= largest]
    if not fits:
        raise InputError(f"LoRA rank {largest}: vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}; serve the merged "
                         "model the export stage writes instead")
    return fits[0]


def server_options(params: Params, adapters: dict[str, str]) -> dict[str, Any]:
    """``judge.serve``'s options plus the LoRA ones: the engine section ``politune.serve`` turns into flags."""
    options: dict[str, Any] = dict(params.judge.serve, served_model_name=BASE)
    if adapters:
        options.update(enable_lora=True, lora_modules=[f"{name}={path}" for name, path in adapters.items()],
                       max_lora_rank=lora_rank(params, adapters), max_loras=len(adapters))
    return options


def parse_adapters(values: list[str]) -> dict[str, str]:
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--adapter {value!r}: expected NAME=PATH (e.g. dpo=DIR)")
        if name == BASE:
            raise InputError(f"--adapter {value!r}: {BASE!r} is the target model's own name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise InputError(f"--adapter {value!r}: {path} holds no adapter_config.json (run `dvc repro` first)")
        adapters[name] = path
    return adapters


def answer(client, model: str, prompt: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0.0, max_tokens=max_tokens)
    return reply.choices[0].message.content or ""


def side_by_side(client, models: list[str], prompts, max_tokens: int, out=sys.stdout) -> None:
    for prompt in prompts:
        print(f"\n> {prompt}", file=out)
        for model in models:
            print(f"\n[{model}]\n{answer(client, model, prompt, max_tokens).strip()}", file=out, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("serve", "chat"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="the target model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a LoRA adapter to serve under NAME (repeat: sft=DIR dpo=DIR)")
    parser.add_argument("--port", type=int, default=8000, help="serve: the port (loopback only)")
    parser.add_argument("--prompt", action="append", default=[], help="chat: a prompt (else read from stdin)")
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args(argv)
    params = load_params(args.params, ("base", "lora", "judge"))
    adapters = parse_adapters(args.adapter)
    options = server_options(params, adapters)
    from politune import serve

    if args.command == "serve":
        import os
        import subprocess

        env = dict(os.environ, **serve.engine_options(options)[0])
        cmd = serve.server_command(args.model, args.port, options, params.base.seed)
        print(f"serving {BASE} ({args.model}) and {', '.join(adapters) or 'no adapters'} at "
              f"http://127.0.0.1:{args.port}/v1", flush=True)
        sys.exit(subprocess.call(cmd, env=env))
    from openai import OpenAI

    with serve.serving(args.model, options, params.base.seed, params.judge.startup_timeout) as url:
        client = OpenAI(base_url=url, api_key="EMPTY")
        prompts = args.prompt or (line.strip() for line in sys.stdin if line.strip())
        side_by_side(client, [BASE, *adapters], prompts, args.max_tokens)


if __name__ == "__main__":
    run_main(main)
