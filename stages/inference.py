"""Running the evaluated models locally: the target model with its LoRA adapters, chat prompts, option
probabilities and free generation. Shared by ``evaluate`` (the compass) and ``judge`` (open answers).

One base model is loaded once; the adapters are loaded beside each other on it and switched by name, and "base" is
the model with the adapters disabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def load_with_adapters(model_dir: str | Path, adapters: dict[str, str | Path]):
    """Return (model, tokenizer): the base model with each named adapter loaded (none active outside ``use``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapters:
        (first, first_path), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first)
        for name, path in rest:
            model.load_adapter(str(path), adapter_name=name)
        model.eval()
    return model, tokenizer


@contextlib.contextmanager
def use(model, name: str) -> Iterator[None]:
    """Run the block as model ``name``: "base" (adapters disabled) or an adapter's name."""
    if name == "base":
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
    else:
        model.set_adapter(name)
        yield


def chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def option_token_ids(tokenizer, n_options: int = 4) -> list[int]:
    ids = []
    for d in range(n_options):
        toks = tokenizer.encode(str(d), add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"option {d} is not a single token for this tokenizer: {toks}")
        ids.append(toks[0])
    return ids


def option_logprobs(model, tokenizer, prompts: list[str], option_ids: list[int], batch_size: int) -> np.ndarray:
    """Log-probabilities of the options as the next token after each chat prompt, renormalised over the options."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            texts = chat_texts(tokenizer, prompts[start : start + batch_size])
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = model(**enc).logits[:, -1, :].float()
            out.append(torch.log_softmax(logits[:, option_ids], dim=-1).numpy())
    return np.concatenate(out)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
             batch_size: int) -> list[str]:
    """Free chat answers, batched; greedy when ``temperature`` is 0, else seeded sampling (reproducible)."""
    import torch

    answers = []
    sample = temperature > 0
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(chat_texts(tokenizer, prompts[start : start + batch_size]), return_tensors="pt",
                            padding=True, add_special_tokens=False)
            torch.manual_seed(seed + start)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
