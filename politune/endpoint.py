"""One OpenAI-compatible endpoint through the ``openai`` client, shared by the ``openai`` annotation backend
(``annotate.openai``) and the judge (``judge.endpoint``): the key from the environment variable the params name
(never from params), the params' timeout and bounded retries with backoff (the client's own), ``concurrency``
requests at a time, and one ``EndpointError`` naming the endpoint when it fails."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from politune.common import EndpointError
from politune.schema import Client


class Endpoint:
    def __init__(self, base_url: str, cfg: Client, role: str, fix: str) -> None:
        """``role`` names the endpoint in errors (``annotation``, ``judge``); ``fix`` is the param to correct."""
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                             timeout=cfg.timeout, max_retries=cfg.max_retries)
        self.where = f"{base_url} (timeout {cfg.timeout:g} s, {cfg.max_retries} retries with backoff)"
        self.concurrency = cfg.concurrency
        self.role, self.fix = role, fix

    def map(self, fn, items) -> list:
        """``[fn(item) for item in items]``, ``concurrency`` at a time; an API failure raises ``EndpointError``."""
        import openai

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(fn, items))
        except openai.APIError as exc:
            raise EndpointError(f"{self.role} endpoint {self.where} failed: {type(exc).__name__}: {exc}; "
                                f"start the server or fix {self.fix}, then rerun") from exc
