"""Serving the tuned models: ``vllm serve`` with the adapters as LoRA modules answers as local PEFT generation does."""

import io

import pytest

from politune.common import InputError
from tests.helpers import PARAMS, typed

PROMPT = "Should taxes on the rich be raised?"


def params(**lora):
    return typed(base=PARAMS["base"], lora=dict(PARAMS["lora"], **lora), judge=PARAMS["judge"])


def test_server_options_serve_every_adapter_at_a_rank_vllm_accepts(tmp_path):
    from politune import chat
    from politune.serve import engine_args

    for name, r in (("a", 4), ("b", 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(f'{{"r": {r}}}')
    adapters = chat.parse_adapters([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    args = engine_args(chat.server_options(params(r=16), adapters))
    assert args[args.index("--lora-modules") + 1:][:2] == [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    assert args[args.index("--max-lora-rank") + 1] == "32", "rank 24 rounds up to vLLM's 32"
    assert "--enable-lora" in args and args[args.index("--served-model-name") + 1] == "base"
    assert chat.lora_rank(params(r=4), {"a": str(tmp_path / "a")}) == 8
    with pytest.raises(InputError, match="vLLM serves ranks up to 512"):
        chat.lora_rank(params(r=1024), {})
    with pytest.raises(InputError, match="expected NAME=PATH"):
        chat.parse_adapters(["models/dpo"])
    with pytest.raises(InputError, match="holds no adapter_config.json"):
        chat.parse_adapters([f"dpo={tmp_path}"])


@pytest.mark.slow
def test_served_adapter_answers_as_local_peft(smollm2_dir, lora_server):
    """The adapter served as a LoRA module by vLLM's CPU build gives the greedy answer local PEFT generation gives
    (and not the base model's); the base model is served beside it under its own name (the server is `make serve`'s,
    started with politune.chat's options: tests/conftest.py)."""
    from openai import OpenAI

    from politune import chat
    from politune.inference import generate, load_with_adapters, use

    model, tokenizer = load_with_adapters(smollm2_dir, {"strong": lora_server.adapter})
    local = {}
    for name in ("base", "strong"):
        with use(model, name):
            local[name] = generate(model, tokenizer, [PROMPT], 24, 0.0, 0, 1)[0]
    assert local["strong"] != local["base"], "the adapter must change the answer for this test to mean anything"
    client = OpenAI(base_url=lora_server.url, api_key="EMPTY")
    served = {name: chat.answer(client, name, PROMPT, 24).strip() for name in ("base", "strong")}
    out = io.StringIO()
    chat.side_by_side(client, ["base", "strong"], [PROMPT], 24, out=out)
    assert served == local
    assert f"> {PROMPT}" in out.getvalue() and f"[strong]\n{local['strong']}" in out.getvalue()
