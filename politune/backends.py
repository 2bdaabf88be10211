"""Annotation backends: the same two operations, the same prompts and the same JSON schema for all three.

- ``loglikelihoods(prefixes, texts)``: the log-likelihood of each text after each prefix (scoring);
- ``generate_json(chats, schema, ...)``: chat completions constrained to a JSON schema (triplets).

``vllm``: the offline ``vllm.LLM`` engine (structured outputs). ``serve``: a ``vllm serve`` the stage starts and
stops, through the ``openai`` backend (vLLM's data-parallel mode: ``annotate.engine.data_parallel_size``). ``openai``: any OpenAI-compatible endpoint through
the ``openai`` client (``vllm serve``, or a hosted API): JSON-schema ``response_format`` for generation, and
completions with ``echo`` + ``logprobs`` for scoring; the key comes from the environment variable named in params,
never from params. ``transformers``: batched ``generate`` with xgrammar's logits processor for the schema.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from politune.common import ParamsError
from politune.endpoint import Endpoint
from politune.schema import Annotate
from politune.schema import OpenAI as OpenAIParams
from politune.schema import Transformers as TransformersParams

log = logging.getLogger("politune.backends")
BACKENDS = ("vllm", "serve", "openai", "transformers")


class Backend:
    tokens_generated: int = 0

    def loglikelihoods(self, prefixes: list[str], texts: list[str], max_text_tokens: int) -> np.ndarray:
        raise NotImplementedError

    def generate_json(self, chats, schema, max_tokens: int, temperature: float, seed: int | None) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VLLMBackend(Backend):
    """The offline vLLM engine. Create it under ``if __name__ == "__main__":`` (vLLM spawns workers)."""

    def __init__(self, model: str, engine: dict[str, Any], seed: int) -> None:
        from politune.serve import engine_options

        env, kwargs = engine_options(engine)
        for key, value in env.items():
            os.environ.setdefault(key, value)
        log.info("vLLM engine: dtype %s", kwargs.get("dtype"))
        from vllm import LLM

        self.llm = LLM(model=model, seed=seed, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.tokens_generated = 0

    def loglikelihoods(self, prefixes, texts, max_text_tokens):
        from vllm import SamplingParams

        prefix_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prefixes]
        text_ids = [self.tokenizer.encode(t, add_special_tokens=False)[:max_text_tokens] for t in texts]
        prompts = [{"prompt_token_ids": pre + ids} for ids in text_ids for pre in prefix_ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = np.zeros((len(texts), len(prefixes)))
        for k, out in enumerate(outs):
            i, j = divmod(k, len(prefixes))
            ids = out.prompt_token_ids
            scores[i, j] = sum(out.prompt_logprobs[t][ids[t]].logprob for t in range(len(prefix_ids[j]), len(ids)))
        return scores

    def generate_json(self, chats, schema, max_tokens, temperature, seed):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                structured_outputs=StructuredOutputsParams(json=schema))
        outs = self.llm.chat(chats, params, use_tqdm=False)
        self.tokens_generated += sum(len(o.outputs[0].token_ids) for o in outs)
        return [o.outputs[0].text for o in outs]


class OpenAIBackend(Backend):
    """Any OpenAI-compatible endpoint. Timeouts and bounded retries with backoff are the client's own."""

    def __init__(self, cfg: OpenAIParams, model_dir: str) -> None:
        """``model_dir``: the annotator's local directory, the model name by default (``vllm serve <dir>`` serves it
        under that name) and the tokenizer that cuts posts."""
        self.endpoint = Endpoint(cfg.base_url, cfg, "annotation", "annotate.openai.base_url")
        self.client = self.endpoint.client
        self.model = cfg.model or model_dir
        self.model_dir = model_dir
        self.batch_size = cfg.batch_size
        self.tokens_generated = 0

    def loglikelihoods(self, prefixes, texts, max_text_tokens):
        # Posts are cut to max_text_tokens tokens of the annotator's own tokenizer (the local model directory), as
        # the other backends cut them; character offsets then separate prefix from text in the endpoint's reply.
        from politune.inference import load_tokenizer

        tokenizer = load_tokenizer(self.model_dir)
        texts = [tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)[:max_text_tokens]) for t in texts]
        jobs = [(i, j, prefixes[j], prefixes[j] + t) for i, t in enumerate(texts) for j in range(len(prefixes))]
        scores = np.zeros((len(texts), len(prefixes)))

        def run(batch):
            resp = self.client.completions.create(model=self.model, prompt=[b[3] for b in batch], max_tokens=1,
                                                  temperature=0.0, echo=True, logprobs=1)
            for choice in resp.choices:
                i, j, prefix, prompt = batch[choice.index]
                lp = choice.logprobs  # echo: the prompt's tokens, then the generated one
                scores[i, j] = sum(value for offset, value in zip(lp.text_offset, lp.token_logprobs)
                                   if len(prefix) <= offset < len(prompt) and value is not None)

        batches = [jobs[k : k + self.batch_size] for k in range(0, len(jobs), self.batch_size)]
        self.endpoint.map(run, batches)
        return scores

    def generate_json(self, chats, schema, max_tokens, temperature, seed):
        fmt = {"type": "json_schema", "json_schema": {"name": "triplet", "schema": schema, "strict": True}}

        def run(chat):
            resp = self.client.chat.completions.create(model=self.model, messages=chat, max_tokens=max_tokens,
                                                       temperature=temperature, seed=seed, response_format=fmt)
            return resp.choices[0].message.content or "", (resp.usage.completion_tokens if resp.usage else 0)

        results = self.endpoint.map(run, chats)
        self.tokens_generated += sum(n for _, n in results)
        return [text for text, _ in results]


class ServedBackend(OpenAIBackend):
    """``annotate.backend: serve``: the stage starts ``vllm serve`` of the annotator with ``annotate.engine`` as its
    flags and talks to it as to any endpoint (``annotate.openai``'s client settings; the base URL is the server's).
    This is the data-parallel route: ``data_parallel_size: N`` runs N engine cores behind one endpoint, vLLM's
    coordinator balancing the requests between them (across nodes with ``data_parallel_size_local``,
    ``data_parallel_address`` and ``data_parallel_rpc_port``; docs/paper-scale.md). ``close`` stops the server."""

    def __init__(self, model_dir: str, cfg: Annotate, seed: int, log_path: str | None = None) -> None:
        import contextlib

        from politune.serve import serving

        self._server = contextlib.ExitStack()
        url = self._server.enter_context(serving(model_dir, cfg.engine, seed, log_path=log_path))
        try:
            super().__init__(cfg.openai.model_copy(update={"base_url": url}), model_dir)
        except BaseException:
            self._server.close()
            raise

    def close(self) -> None:
        self._server.close()


class TransformersBackend(Backend):
    """Batched ``generate`` on CPU or GPU, for machines with neither vLLM nor an endpoint."""

    def __init__(self, model_dir: str, cfg: TransformersParams, seed: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from politune.inference import load_tokenizer, onednn_linears

        self.torch = torch
        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype))
        self.model.eval()
        onednn_linears(self.model)  # fp32 on CPU: as evaluate and judge run their models
        self.batch_size = cfg.batch_size
        self.seed = seed
        self.tokens_generated = 0
        self._compiler = None

    def loglikelihoods(self, prefixes, texts, max_text_tokens):
        torch = self.torch
        prefix_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prefixes]
        text_ids = [self.tokenizer.encode(t, add_special_tokens=False)[:max_text_tokens] for t in texts]
        seqs = [(i, j, prefix_ids[j] + ids, len(prefix_ids[j])) for i, ids in enumerate(text_ids)
                for j in range(len(prefixes))]
        scores = np.zeros((len(texts), len(prefixes)))
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for k in range(0, len(seqs), self.batch_size):
                batch = seqs[k : k + self.batch_size]
                width = max(len(s[2]) for s in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, _, seq, _) in enumerate(batch):
                    ids[r, : len(seq)] = torch.tensor(seq)
                    mask[r, : len(seq)] = 1
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for r, (i, j, seq, start) in enumerate(batch):
                    targets = torch.tensor(seq[start:])
                    scores[i, j] = logp[r, start - 1 : len(seq) - 1].gather(1, targets[:, None]).sum().item()
        return scores

    def generate_json(self, chats, schema, max_tokens, temperature, seed):
        import json

        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        from politune.inference import generate_chats

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        grammar = self._compiler.compile_json_schema(json.dumps(schema))
        outputs = generate_chats(self.model, self.tokenizer, chats, max_tokens, temperature, seed, self.batch_size,
                                 processors=lambda: [LogitsProcessor(grammar)])
        self.tokens_generated += sum(n for _, n in outputs)
        return [text for text, _ in outputs]


def make_backend(cfg: Annotate, model_dir: str, seed: int) -> Backend:
    name = cfg.backend
    if name == "vllm":
        return VLLMBackend(model_dir, cfg.engine, seed)
    if name == "serve":
        return ServedBackend(model_dir, cfg, seed)
    if name == "openai":
        return OpenAIBackend(cfg.openai, model_dir)
    if name == "transformers":
        return TransformersBackend(model_dir, cfg.transformers, seed)
    raise ParamsError(f"annotate.backend: {name!r} is not one of {', '.join(BACKENDS)}")
