"""Running the evaluated models locally: the target model with its LoRA adapters, chat prompts, option
probabilities and free generation. Shared by ``evaluate`` (the compass) and ``judge`` (open answers).

One base model is loaded once; the adapters are loaded beside each other on it and switched by name, and "base" is
the model with the adapters disabled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger("politune.inference")
MODELS = ("base", "sft", "dpo")  # the evaluated models: the target, and the target with each adapter


def load_tokenizer(model_dir: str | Path, padding_side: str | None = None):
    """The model's tokenizer, with the end-of-sequence token as padding where it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side:
        tokenizer.padding_side = padding_side
    return tokenizer


def device() -> str:
    """Where the evaluated models run: the GPU when there is one (in fp32 as on CPU), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_with_adapters(model_dir: str | Path, adapters: dict[str, str | Path], onednn: bool = False):
    """Return (model, tokenizer): the base model with each named adapter loaded (none active outside ``use``), on
    ``device()``; with ``onednn``, for inference only, its linear layers through oneDNN on CPU (``onednn_linears``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapters:
        (first, first_path), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first)
        for name, path in rest:
            model.load_adapter(str(path), adapter_name=name)
        model.eval()
    model = model.to(device())
    if onednn:
        log.info("linear layers through oneDNN: %d", onednn_linears(model))
    return model, tokenizer


def onednn_available() -> bool:
    """Whether this torch can run fp32 linear layers through oneDNN (``torch.ops.mkldnn``, as torch.compile's CPU
    backend does)."""
    import torch

    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def onednn_linears(model, min_features: int = 64) -> int:
    """Run the model's fp32 ``nn.Linear`` layers (at least ``min_features`` wide: not the LoRA matrices) through
    oneDNN instead of torch's default BLAS, for inference on CPU; returns how many.

    Why: torch's CPU wheel does fp32 matrix products with MKL, which uses its AVX2 kernels on AMD CPUs, while
    oneDNN uses AVX-512 where the CPU has it. On the 2-core AVX-512 EPYC of ``make bench`` a 576 x 1536 fp32 product
    ran at about 200 GFLOP/s through MKL and about 490 through oneDNN, and the compass's forced choice took 7.7 s
    instead of 14.3 s per model and template set. Both are fp32 with fp32 accumulation; only the order of the sums
    differs (option probabilities within 2e-5 of MKL's on the default models, the same answers:
    ``tests/test_evaluate.py``). Each layer keeps its dense weight (read by PEFT and by tied embeddings) beside a
    oneDNN-packed copy of it, packed again if the dense weight is changed in place. A PEFT LoRA layer on such a layer
    runs the active adapter merged into a packed copy of the base weight (``OneDNNLoRA``): one product instead of
    three and an addition. A gated SiLU MLP whose gate and up layers are swapped computes its activation and
    product in those layers' epilogues (``OneDNNMLP``). Call it after the adapters are loaded. Nothing is changed
    on a GPU, for other dtypes, or where this torch has no oneDNN (``onednn_available``); with gradients on, every
    layer runs as before.
    """
    import torch

    if not onednn_available() or next(model.parameters()).device.type != "cpu":
        return 0

    def pack(weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    class OneDNNLinear(torch.nn.Module):
        onednn = True

        def __init__(self, dense: torch.nn.Linear):
            super().__init__()
            self.dense = dense
            self.in_features, self.out_features = dense.in_features, dense.out_features
            self.packed, self.packed_version = pack(dense.weight), dense.weight._version

        @property
        def weight(self):
            return self.dense.weight

        @property
        def bias(self):
            return self.dense.bias

        def product(self, x, packed):
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.dense.bias, "none", [], "")

        def current(self):
            """The packed weight, packed again if the dense weight was changed in place (e.g. PEFT's merge)."""
            if self.dense.weight._version != self.packed_version:
                self.packed, self.packed_version = pack(self.dense.weight), self.dense.weight._version
            return self.packed

        def forward(self, x):
            if x.dtype != torch.float32 or torch.is_grad_enabled():
                return self.dense(x)
            return self.product(x, self.current())

    class OneDNNLoRA(torch.nn.Module):
        """A PEFT LoRA linear layer (kept as ``lora``: PEFT's ``set_adapter`` and ``disable_adapter`` still set its
        state) whose base layer runs through oneDNN: with one plain LoRA adapter active, x @ (W + scaling B A)^T in
        one packed product. The merged copy is made when an adapter is first run after another (about 80 ms for
        the 120 adapted layers of the default model) and only the last one is kept, so memory stays at one copy of
        the adapted layers whatever the number of adapters."""

        onednn = True

        def __init__(self, lora):
            super().__init__()
            self.lora = lora
            self.merged_key, self.merged = None, None

        @property
        def bias(self):
            return self.lora.base_layer.bias

        def current(self):
            """The packed weight of the layer as it is set now (base, or base and the active adapter merged), or
            None where PEFT's own forward must run: merged in place by PEFT, several adapters active, a DoRA-like
            variant, or a LoRA bias."""
            lora, base = self.lora, self.lora.base_layer
            if lora.merged:
                return None
            if lora.disable_adapters:
                return base.current()
            active = [a for a in lora.active_adapters if a in lora.lora_A]
            if len(active) != 1 or active[0] in lora.lora_variant or getattr(lora, "lora_bias", {}).get(active[0]):
                return None
            name = active[0]
            key = (name, base.weight._version, lora.lora_A[name].weight._version, lora.lora_B[name].weight._version)
            if key != self.merged_key:
                self.merged_key, self.merged = key, pack(base.weight + lora.get_delta_weight(name))
            return self.merged

        def forward(self, x, *args, **kwargs):
            lora = self.lora
            if args or kwargs or x.dtype != torch.float32 or torch.is_grad_enabled():
                return lora(x, *args, **kwargs)
            packed = self.current()
            return lora(x) if packed is None else lora.base_layer.product(x, packed)

    class OneDNNMLP(torch.nn.Module):
        """A gated MLP, down(silu(gate(x)) * up(x)) (Llama's, Mistral's, Qwen's), whose gate and up layers run
        through oneDNN (plain or ``OneDNNLoRA``): the SiLU is applied in the gate product's epilogue and the
        multiplication by it in the up product's, instead of two more passes over the activations (a 576 -> 1536 ->
        576 MLP over 880 positions: 13.0 -> 11.3 ms here). Kept as ``mlp``; its own forward runs with gradients on,
        for other dtypes, and where a layer must run PEFT's way."""

        onednn = True

        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            mlp = self.mlp
            if x.dtype != torch.float32 or torch.is_grad_enabled():
                return mlp(x)
            gate, up = mlp.gate_proj.current(), mlp.up_proj.current()
            if gate is None or up is None:
                return mlp(x)
            gated = torch.ops.mkldnn._linear_pointwise(x, gate, mlp.gate_proj.bias, "swish", [], "")
            return mlp.down_proj(torch.ops.mkldnn._linear_pointwise.binary(x, gated, up, mlp.up_proj.bias, "mul"))

    def swap(wrap) -> int:
        """Replace each child for which ``wrap`` returns a module, outside the modules swapped before (here or by an
        earlier call: what they hold stays as it is); returns how many."""
        count = 0
        for module in list(model.modules()):
            if getattr(module, "onednn", False):
                continue
            for name, child in list(module.named_children()):
                new = None if getattr(child, "onednn", False) else wrap(child)
                if new is not None:
                    setattr(module, name, new)
                    count += 1
        return count

    def linear(child):
        if (type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
                and min(child.in_features, child.out_features) >= min_features):
            return OneDNNLinear(child)
        return None

    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # no PEFT, no LoRA layers
        LoraLinear = None

    def lora(child):
        return OneDNNLoRA(child) if type(child) is LoraLinear and isinstance(child.base_layer, OneDNNLinear) else None

    def gated_mlp(child):
        if (type(getattr(child, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")  # torch's, transformers'
                and all(hasattr(getattr(child, p, None), "current") for p in ("gate_proj", "up_proj"))
                and hasattr(child, "down_proj")):
            return OneDNNMLP(child)
        return None

    swapped = swap(linear)  # in this order: a LoRA layer wraps a swapped base layer, an MLP swapped projections
    swap(lora)
    swap(gated_mlp)
    return swapped


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


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens added (a chat template already holds them)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def shared_prefix_length(ids: list[list[int]]) -> int:
    """How many tokens every sequence starts with, leaving each at least one of its own."""
    if not ids:
        return 0
    limit = min(len(x) for x in ids) - 1
    shared = 0
    while shared < limit and all(x[shared] == ids[0][shared] for x in ids):
        shared += 1
    return shared


class PrefixBatches:
    """Forward passes of many sequences that all start with the same ``shared`` tokens: the shared tokens go through
    the model once and their keys and values are reused by every batch; the rest of each sequence is left-padded
    after them, with its own positions (those of the whole sequence), so a row's last token is at the last position.
    With ``shared`` 0 it is a plain left-padded forward pass."""

    def __init__(self, model, prefix: list[int]):
        import torch

        self.model, self.shared, self.cache = model, len(prefix), None
        if prefix:
            with torch.inference_mode():
                self.cache = model(input_ids=torch.tensor([prefix], device=model.device),
                                   use_cache=True).past_key_values

    def __call__(self, rest: list[list[int]], pad: int, logits_to_keep: int):
        """The logits of the last ``logits_to_keep`` positions of each row (``rest``: the tokens after the shared
        prefix), and the (rows x width) input ids as padded."""
        import copy

        import torch

        dev, shared = self.model.device, self.shared
        width = max(len(r) for r in rest)
        input_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rest], device=dev)
        own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=dev)
        mask = torch.cat([torch.ones(len(rest), shared, dtype=own.dtype, device=dev), own], dim=1)
        positions = (shared + own.cumsum(dim=1) - 1).clamp(min=shared)
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(len(rest))
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None, logits_to_keep=logits_to_keep).logits
        return logits, input_ids


def option_logprobs(model, tokenizer, prompts: list[str], option_ids: list[int], batch_size: int) -> np.ndarray:
    """Log-probabilities of the options as the next token after each chat prompt, renormalised over the options.

    Only the next-token distribution is needed, so the work is cut to what it depends on: the tokens every prompt
    shares (the chat template's opening, often a system prompt) go through the model once (``PrefixBatches``); the
    rest of each prompt is batched with prompts of similar length; and the vocabulary projection runs for the last
    position only. The result equals a plain padded forward pass of each whole prompt up to floating-point rounding
    (``tests/test_evaluate.py`` holds the two to the same answers)."""
    import torch

    ids = token_ids(tokenizer, chat_texts(tokenizer, prompts))
    if not ids:
        return np.zeros((0, len(option_ids)), dtype=np.float32)
    shared = shared_prefix_length(ids)
    out = np.zeros((len(ids), len(option_ids)), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
    with torch.inference_mode():
        forward = PrefixBatches(model, ids[0][:shared])
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits, _ = forward([ids[i][shared:] for i in rows], tokenizer.pad_token_id, 1)
            out[rows] = torch.log_softmax(logits[:, -1, option_ids].float(), dim=-1).cpu().numpy()
    return out


def generate_chats(model, tokenizer, chats: list[list[dict[str, str]]], max_new_tokens: int, temperature: float,
                   seed: int | None, batch_size: int, processors=None) -> list[tuple[str, int]]:
    """Chat completions, batched and left-padded: (text, generated tokens) each; greedy when ``temperature`` is 0,
    else sampled with ``seed`` + the batch's offset (reproducible). ``processors``: a function returning fresh logits
    processors for each batch (e.g. a JSON-schema grammar, which keeps state while it generates)."""
    import torch

    tokenizer.padding_side = "left"
    sample = temperature > 0
    out_rows = []
    with torch.inference_mode():
        for start in range(0, len(chats), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in chats[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            if seed is not None:
                torch.manual_seed(seed + start)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=None, top_k=None,
                                 logits_processor=processors() if processors else None,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :].cpu():
                row = row[row != tokenizer.pad_token_id]
                out_rows.append((tokenizer.decode(row, skip_special_tokens=True), int(len(row))))
    return out_rows


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
             batch_size: int) -> list[str]:
    """Free answers to single-turn prompts (``generate_chats``), stripped."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    return [text.strip() for text, _ in generate_chats(model, tokenizer, chats, max_new_tokens, temperature, seed,
                                                       batch_size)]


def chat_continuation_ids(tokenizer, prompt: list[dict[str, str]], answer: list[dict[str, str]],
                          max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of a chat prompt and of the answer that continues it, split as TRL's DPOTrainer splits them: the
    prompt (with the generation prompt) and the whole conversation are tokenized through the chat template, and the
    answer is what follows their common prefix (so it ends with the template's end-of-turn tokens). Cut to
    ``max_length`` tokens: the answer keeps its start, the prompt its end."""
    def ids(messages, generation_prompt):
        return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation_prompt)["input_ids"])

    prompt_ids, full = ids(prompt, True), ids(list(prompt) + list(answer), False)
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    prompt_ids, answer_ids = prompt_ids[:shared], full[shared:]
    if not answer_ids:
        raise ValueError("the chat template renders no answer tokens after the prompt; cannot score the answer")
    answer_ids = answer_ids[: max(1, max_length - min(len(prompt_ids), max_length // 2))]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return prompt_ids, answer_ids


def continuation_logprobs(model, tokenizer, prompts: list[list[dict[str, str]]], answers: list[list[dict[str, str]]],
                          batch_size: int, max_length: int, share_prefix: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each answer given its chat prompt, and the answer's token count.

    Batched longest first and left-padded (with position ids that skip the padding), so every row's answer ends at
    the last position and the vocabulary projection is computed for the answer positions only (``logits_to_keep``);
    with ``share_prefix``, the tokens every prompt starts with (the chat template's opening) go through the model
    once (``PrefixBatches``). The order of the inputs is kept in the outputs.
    """
    import torch

    seqs = [chat_continuation_ids(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    if not seqs:
        return np.zeros(0), np.zeros(0, dtype=int)
    # the prefix stays inside every prompt: the position before an answer's first token must be a row's own
    shared = shared_prefix_length([p for p, _ in seqs]) if share_prefix else 0
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    total, count = np.zeros(len(seqs)), np.zeros(len(seqs), dtype=int)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        forward = PrefixBatches(model, seqs[0][0][:shared])
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            keep = max(len(seqs[i][1]) for i in rows) + 1
            logits, ids = forward([(seqs[i][0] + seqs[i][1])[shared:] for i in rows], pad, keep)
            target = torch.zeros((len(rows), keep - 1), dtype=torch.bool, device=ids.device)
            for r, i in enumerate(rows):
                target[r, keep - 1 - len(seqs[i][1]) :] = True
            logits = logits[:, :-1].float()  # log p(token) = its logit - logsumexp: no second vocabulary-wide tensor
            logp = logits.gather(-1, ids[:, -(keep - 1) :, None])[..., 0] - torch.logsumexp(logits, dim=-1)
            logp = (logp * target).sum(dim=1)
            for r, i in enumerate(rows):
                total[i], count[i] = float(logp[r]), len(seqs[i][1])
    return total, count
