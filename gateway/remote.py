"""Build a remote backend from its configuration entry."""

from __future__ import annotations

import os

from backends.base import Backend
from backends.llamacpp import LlamaCppBackend
from backends.ollama import OllamaBackend, OllamaOptions
from backends.openai_compat import OpenAICompatBackend
from backends.remote import RemoteConfig
from backends.vllm import VLLMBackend
from gateway.settings import RemoteModelSettings

_OPENAI_DIALECTS: dict[str, type[OpenAICompatBackend]] = {
    "openai": OpenAICompatBackend,
    "vllm": VLLMBackend,
    "llamacpp": LlamaCppBackend,
}


def build_remote_backend(model: RemoteModelSettings) -> Backend:
    config = RemoteConfig(
        base_url=model.base_url,
        upstream_model=model.upstream,
        concurrency=model.concurrency,
        api_key=os.environ.get(model.api_key_env) if model.api_key_env else None,
        connect_timeout=model.connect_timeout,
        first_token_timeout=model.first_token_timeout,
        chunk_timeout=model.chunk_timeout,
        request_timeout=model.request_timeout,
        health_interval=model.health_interval,
    )
    if model.backend == "ollama":
        return OllamaBackend(config, OllamaOptions(model.num_ctx, model.keep_alive))
    return _OPENAI_DIALECTS[model.backend](config)
