"""The in-process servers, for tests, benchmarks and CPU demos: [`serve_scripted`] answers with a Python function of
the messages, [`serve_transformers`] with a (tiny) `transformers` model's `generate`. Both run the HTTP server of
`serve.openai_http` on a background thread and accept any `model` name in a request."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .base import ServerHandle
from .openai_http import Reply, StubHTTPError, serve_in_thread

__all__ = ["serve_scripted", "serve_transformers"]

DEFAULT_MAX_TOKENS = 256
"""`max_tokens` used by [`serve_transformers`] when a request gives none."""


def _apply_stop(text: str, stop: Any) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string (excluded, as vLLM does); whether one was found."""
    if not stop:
        return text, False
    stops = [stop] if isinstance(stop, str) else list(stop)
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _chars_to_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def serve_scripted(
    respond: Callable[[list[dict]], str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    delay: float | Callable[[list[dict]], float] = 0.0,
    model_name: str = "scripted",
    fail_first: int = 0,
    fail_status: int = 503,
    keep_requests: int = 256,
) -> ServerHandle:
    """Serve replies computed by `respond(messages)` on a background thread (port 0: a free port).

    Args:
        respond: the reply text for a request's messages. It may raise [`StubHTTPError`] to answer with that HTTP
            status; any other exception answers HTTP 500. It is called from several threads at once.
        delay: seconds to sleep before answering each request, or a function of the messages giving them.
        model_name: the name `/v1/models` lists.
        fail_first: answer the first `fail_first` chat requests with HTTP `fail_status` (to exercise retries).
        keep_requests: how many of the last chat request bodies `handle.requests` keeps.

    The request's `stop` strings cut the reply (excluded) and `max_tokens` truncates it (`finish_reason="length"`).
    Token counts are character counts / 4 (rounded up): the prompt's from the messages' contents, the completion's
    from the reply.
    """
    counter_lock = threading.Lock()
    seen = [0]

    def backend(body: dict) -> Reply:
        messages = body["messages"]
        with counter_lock:
            seen[0] += 1
            index = seen[0]
        pause = delay(messages) if callable(delay) else delay
        if pause > 0:
            time.sleep(pause)
        if index <= fail_first:
            raise StubHTTPError(fail_status, f"injected failure {index} of {fail_first}")
        text = respond(messages)
        if not isinstance(text, str):
            raise TypeError(f"respond must return a str, got {type(text).__name__}")
        text, stopped = _apply_stop(text, body.get("stop"))
        finish_reason = "stop"
        max_tokens = body.get("max_tokens")
        if not stopped and max_tokens is not None and _chars_to_tokens(len(text)) > max_tokens:
            text, finish_reason = text[: 4 * max_tokens], "length"
        prompt_chars = sum(len(m.get("content") or "") for m in messages if isinstance(m.get("content"), str))
        return Reply(text, finish_reason, _chars_to_tokens(prompt_chars), _chars_to_tokens(len(text)))

    return serve_in_thread(backend, host, port, model_name, keep_requests)


# -- transformers ------------------------------------------------------------------------------------------------


def _load_model(model_path_or_model: Any, tokenizer: Any, model_name: str | None) -> tuple[Any, Any, str]:
    """The model, its tokenizer and the name to serve it as; a path or Hub id is loaded (the tokenizer too, unless
    given). The tokenizer must have a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_path_or_model, (str, os.PathLike)):
        path = str(model_path_or_model)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        name = model_name or path
    else:
        model = model_path_or_model
        if tokenizer is None:
            raise ValueError("serve_transformers needs a tokenizer when given a model object")
        name = model_name or getattr(model.config, "_name_or_path", None) or "local-model"
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; serve_transformers renders messages with it")
    return model, tokenizer, name


class _TransformersBackend:
    """Answers a chat request with `model.generate`: render the messages, generate (one request at a time), decode
    and cut at the stop strings."""

    def __init__(self, model: Any, tokenizer: Any):
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        eos_ids = model.generation_config.eos_token_id
        self.eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), None)
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        inputs = self._render(body)
        prompt_tokens = inputs["input_ids"].shape[1]
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        output = self._generate(inputs, body, self._generation_kwargs(body, max_tokens))
        return self._reply(output[0, prompt_tokens:].tolist(), body, prompt_tokens, max_tokens)

    def _render(self, body: dict) -> Any:
        """The messages rendered with the chat template and tokenized, on the model's device (HTTP 400 when the
        template cannot render them)."""
        try:
            prompt = self.tokenizer.apply_chat_template(
                body["messages"],
                tokenize=False,
                add_generation_prompt=True,
                **(body.get("chat_template_kwargs") or {}),
            )
        except Exception as error:
            raise StubHTTPError(400, f"cannot render the messages with the chat template: {error}") from error
        return self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.model.device)

    def _generation_kwargs(self, body: dict, max_tokens: int) -> dict[str, Any]:
        """`generate`'s arguments for the request's sampling fields: sampling when `temperature > 0` (the OpenAI
        default is 1), greedy at 0."""
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0  # OpenAI default
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "eos_token_id": sorted(self.eos_ids) or None,
            "pad_token_id": self.pad_id,
        }
        if temperature > 0:
            top_k = body.get("top_k")
            kwargs.update(
                do_sample=True,
                temperature=temperature,
                top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                top_k=int(top_k) if top_k is not None and int(top_k) > 0 else 0,  # vLLM's -1 / None: no top-k
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if body.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = float(body["repetition_penalty"])
        return kwargs

    def _generate(self, inputs: Any, body: dict, kwargs: dict[str, Any]) -> Any:
        """`model.generate`'s output, seeded by the request's `seed`; one request at a time."""
        import torch

        with self.lock:
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            with torch.no_grad():
                return self.model.generate(**inputs, **kwargs)

    def _reply(self, generated: list[int], body: dict, prompt_tokens: int, max_tokens: int) -> Reply:
        """The generated tokens decoded and cut at the request's stop strings, with why they ended and their
        count (the EOS token included, as vLLM counts it; after a cut, the kept text's tokens)."""
        ended = bool(generated) and generated[-1] in self.eos_ids
        finish_reason = "stop" if ended or len(generated) < max_tokens else "length"
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        completion_tokens = len(generated)
        text, stopped = _apply_stop(text, body.get("stop"))
        if stopped:
            finish_reason = "stop"
            completion_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Reply(text, finish_reason, prompt_tokens, completion_tokens)


def serve_transformers(
    model_path_or_model: Any,
    tokenizer: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    keep_requests: int = 0,
) -> ServerHandle:
    """Serve a `transformers` causal LM with `model.generate` on a background thread (port 0: a free port).

    `model_path_or_model` is a loaded model or a path / Hub id (then the tokenizer is loaded from it too, unless
    given). Messages are rendered with the tokenizer's chat template (`add_generation_prompt=True`, plus a request's
    `chat_template_kwargs`). `temperature > 0` samples (with `top_p`, `top_k`, `repetition_penalty`, `seed`);
    `temperature == 0` is greedy; a request without `max_tokens` gets `DEFAULT_MAX_TOKENS`. Stop strings cut the
    decoded text afterwards. Generation is serialized with a lock. `prompt_tokens` counts the rendered prompt's
    tokens and `completion_tokens` the generated ones (the EOS token included, as vLLM counts them; after a stop
    string cut, the kept text's tokens). Meant for tiny models in tests and CPU demos, not for throughput. No request
    body is kept unless `keep_requests` says how many of the last ones `handle.requests` holds.
    """
    model, tokenizer, name = _load_model(model_path_or_model, tokenizer, model_name)
    return serve_in_thread(_TransformersBackend(model, tokenizer), host, port, name, keep_requests)
