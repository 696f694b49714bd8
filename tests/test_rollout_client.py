"""The async chat client against the local OpenAI-compatible servers, and the server helpers themselves."""

import asyncio
import http.server
import subprocess
import sys
import threading
import time

import pytest

from entropo_trl.rollout.client import (
    ChatClient,
    Completion,
    ContextLimitExceeded,
    LLMError,
    SamplingParams,
    estimate_prompt_tokens,
)
from entropo_trl.rollout.serve import (
    ServerStartError,
    StubHTTPError,
    serve_scripted,
    serve_transformers,
    start_vllm_server,
    vllm_serve_command,
    wait_until_healthy,
)

USER = [{"role": "user", "content": "Fix the bug in parse()."}]


def run(coroutine):
    return asyncio.run(coroutine)


async def complete_once(url, messages=USER, sampling=None, **client_kwargs):
    async with ChatClient(url, "test-model", **client_kwargs) as client:
        completion = await client.complete(messages, sampling)
        return completion, dict(client.usage)


def echo(messages):
    return "echo: " + messages[-1]["content"]


# -- completions ------------------------------------------------------------------------------------------------


def test_completion_text_and_usage():
    with serve_scripted(echo) as server:
        completion, usage = run(complete_once(server.base_url))
    assert isinstance(completion, Completion)
    assert completion.text == "echo: Fix the bug in parse()."
    assert completion.finish_reason == "stop"
    assert completion.prompt_tokens == -(-len(USER[0]["content"]) // 4)
    assert completion.completion_tokens == -(-len(completion.text) // 4)
    assert completion.latency > 0
    assert usage == {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "requests": 1,
        "retries": 0,
    }


def test_sampling_extras_in_request_body():
    sampling = SamplingParams(temperature=0.3, top_p=0.9, top_k=7, repetition_penalty=1.1, max_tokens=100, seed=3)
    with serve_scripted(echo) as server:
        run(complete_once(server.base_url, sampling=sampling))
        (body,) = server.requests
    assert body["model"] == "test-model"
    assert body["messages"] == USER
    assert body["temperature"] == 0.3 and body["top_p"] == 0.9
    assert body["top_k"] == 7 and body["repetition_penalty"] == 1.1
    assert body["max_tokens"] == 100 and body["seed"] == 3
    assert "stop" not in body


def test_sampling_none_fields_are_left_out():
    body = SamplingParams(top_k=None, repetition_penalty=None).to_request()
    assert "top_k" not in body and "repetition_penalty" not in body and "seed" not in body
    assert SamplingParams(stop=["</function>"]).to_request()["stop"] == ["</function>"]


def test_stop_strings_and_max_tokens_in_the_stub():
    with serve_scripted(lambda messages: "thought\n<function=finish>\n</function>\nmore") as server:
        stopped, _ = run(complete_once(server.base_url, sampling=SamplingParams(stop=["</function>"])))
        cut, _ = run(complete_once(server.base_url, sampling=SamplingParams(max_tokens=2)))
    assert stopped.text == "thought\n<function=finish>\n" and stopped.finish_reason == "stop"
    assert cut.text == "thought\n" and cut.finish_reason == "length" and cut.completion_tokens == 2


def test_api_key_header(monkeypatch):
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["auth"] = self.headers.get("Authorization")
            self.rfile.read(int(self.headers["Content-Length"]))
            data = b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "from-env")
        completion, usage = run(complete_once(url))
        assert seen["auth"] == "Bearer from-env"
        assert completion.text == "ok" and completion.prompt_tokens == 0  # usage is optional in a response
        run(complete_once(url, api_key="explicit"))
        assert seen["auth"] == "Bearer explicit"
        monkeypatch.delenv("OPENAI_API_KEY")
        run(complete_once(url))
        assert seen["auth"] is None
    finally:
        server.shutdown()
        server.server_close()


# -- errors and retries -----------------------------------------------------------------------------------------


def test_retries_on_500_and_503_then_succeeds():
    statuses = iter([500, 503])

    def flaky(messages):
        status = next(statuses, None)
        if status is not None:
            raise StubHTTPError(status, "overloaded")
        return "finally"

    with serve_scripted(flaky) as server:
        completion, usage = run(complete_once(server.base_url, backoff=0.01))
        assert len(server.requests) == 3
    assert completion.text == "finally"
    assert usage["retries"] == 2 and usage["requests"] == 1


def test_fail_first_and_429_are_retried():
    with serve_scripted(echo, fail_first=2, fail_status=429) as server:
        completion, usage = run(complete_once(server.base_url, backoff=0.01))
    assert completion.text.startswith("echo:") and usage["retries"] == 2


def test_retries_exhausted_raise_llm_error_with_status_and_body():
    with serve_scripted(echo, fail_first=100, fail_status=502) as server:
        with pytest.raises(LLMError, match="after 3 attempts.*HTTP 502.*injected failure") as info:
            run(complete_once(server.base_url, max_retries=2, backoff=0.01))
        assert len(server.requests) == 3
    assert info.value.status == 502


def test_no_retry_on_400():
    def bad(messages):
        raise StubHTTPError(400, "unknown field 'foo'")

    with serve_scripted(bad) as server:
        with pytest.raises(LLMError, match="HTTP 400.*unknown field") as info:
            run(complete_once(server.base_url, backoff=0.01))
        assert len(server.requests) == 1
    assert info.value.status == 400 and not isinstance(info.value, ContextLimitExceeded)


def test_server_context_length_error_raises_context_limit_exceeded():
    def too_long(messages):
        raise StubHTTPError(
            400,
            "This model's maximum context length is 32768 tokens. However, you requested 40000 tokens "
            "(24000 in the messages, 16000 in the completion).",
        )

    with serve_scripted(too_long) as server:
        with pytest.raises(ContextLimitExceeded, match="maximum context length"):
            run(complete_once(server.base_url, backoff=0.01))
        assert len(server.requests) == 1


def test_timeout_is_retried_then_llm_error():
    with serve_scripted(echo, delay=0.5) as server:
        start = time.perf_counter()
        with pytest.raises(LLMError, match="after 2 attempts.*Timeout") as info:
            run(complete_once(server.base_url, timeout=0.1, max_retries=1, backoff=0.01))
        assert time.perf_counter() - start < 2.0
        assert len(server.requests) == 2
    assert info.value.status is None


def test_connection_refused_is_retried_then_llm_error():
    with serve_scripted(echo) as server:
        url = server.base_url
    with pytest.raises(LLMError, match="after 3 attempts.*Connect"):
        run(complete_once(url, max_retries=2, backoff=0.01))


def test_malformed_response_raises_llm_error():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            data = b'{"no": "choices"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with pytest.raises(LLMError, match="malformed"):
            run(complete_once(f"http://127.0.0.1:{server.server_address[1]}/v1"))
    finally:
        server.shutdown()
        server.server_close()


# -- context accounting -----------------------------------------------------------------------------------------


def test_max_tokens_capped_to_the_remaining_context():
    messages = [{"role": "user", "content": "x" * 300}]  # ~100 tokens + 4 by the estimate
    assert estimate_prompt_tokens(messages) == 104
    with serve_scripted(echo) as server:
        run(complete_once(server.base_url, messages, SamplingParams(max_tokens=1000), max_context_tokens=1104))
        run(complete_once(server.base_url, messages, SamplingParams(max_tokens=1000), max_context_tokens=204))
        run(complete_once(server.base_url, messages, SamplingParams(max_tokens=1000), max_context_tokens=2000))
        assert [body["max_tokens"] for body in server.requests] == [1000, 100, 1000]


def test_prompt_that_cannot_fit_is_not_sent():
    messages = [{"role": "user", "content": "x" * 300}]
    with serve_scripted(echo) as server:
        with pytest.raises(ContextLimitExceeded, match="104 tokens, estimated"):
            run(complete_once(server.base_url, messages, max_context_tokens=104))

        async def with_hint():
            async with ChatClient(server.base_url, "m", max_context_tokens=1000) as client:
                with pytest.raises(ContextLimitExceeded, match="1200 tokens, given"):
                    await client.complete(messages, prompt_tokens_hint=1200)
                await client.complete(messages, SamplingParams(max_tokens=500), prompt_tokens_hint=990)

        run(with_hint())
        assert [body["max_tokens"] for body in server.requests] == [10]


# -- concurrency ------------------------------------------------------------------------------------------------


def counting(respond, seconds=0.05):
    """`respond`, taking `seconds` per request, and a list whose first item becomes the most requests in flight."""
    in_flight, peak, lock = [0], [0], threading.Lock()

    def tracked(messages):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(seconds)
        with lock:
            in_flight[0] -= 1
        return respond(messages)

    return tracked, peak


def test_concurrent_requests_are_served_in_parallel():
    tracked, peak = counting(echo)

    async def many(url, n):
        async with ChatClient(url, "m") as client:
            results = await asyncio.gather(*(client.complete([{"role": "user", "content": str(i)}]) for i in range(n)))
            return results, dict(client.usage)

    with serve_scripted(tracked) as server:
        results, usage = run(many(server.base_url, 32))
    assert [r.text for r in results] == [f"echo: {i}" for i in range(32)]  # each answer to its own request
    assert usage["requests"] == 32 and usage["retries"] == 0
    assert peak[0] >= 16, f"at most {peak[0]} requests were in flight at once: not sent in parallel"


def test_one_client_per_event_loop():
    """The connection pool binds to the loop the client first ran in; another loop gets a clear error, and works
    after `aclose()`."""
    client = ChatClient("http://unused", "m", max_concurrency=1)

    async def twice(url):
        client.base_url, client.url = url, f"{url}/chat/completions"
        results = await asyncio.gather(client.complete(USER), client.complete(USER))  # contend for the semaphore
        return [r.text for r in results]

    with serve_scripted(echo) as server:
        assert run(twice(server.base_url)) == ["echo: " + USER[0]["content"]] * 2
        with pytest.raises(RuntimeError, match="one client per event loop"):
            run(twice(server.base_url))
        run(client.aclose())
        assert run(twice(server.base_url)) == ["echo: " + USER[0]["content"]] * 2
        run(client.aclose())
        run(client.aclose())  # closing twice is fine
    assert client.usage["requests"] == 4


def test_backoff_waits_grow():
    client = ChatClient("http://unused", "m", backoff=1.0)
    waits = [client._wait(attempt, None) for attempt in range(4)]
    for attempt, wait in enumerate(waits):
        assert 2**attempt <= wait < 1.5 * 2**attempt
    assert client._wait(10, None) < 1.5 * 60  # capped


def test_bad_sampling_and_client_settings_are_refused():
    assert SamplingParams(stop="</function>").to_request()["stop"] == ["</function>"]  # not its characters
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 7}, {"max_tokens": 0}, {"top_k": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    for timeout in (0, -1):
        with pytest.raises(ValueError, match="timeout"):
            ChatClient("http://127.0.0.1:9/v1", "m", timeout=timeout)


def _recording_server(respond):
    """A server on 127.0.0.1 that records each request's method and request target, and answers with
    `respond(handler)`."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self):
            seen.append((self.command, self.path))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            respond(self)

        do_GET = do_POST = _any  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", seen


def _ok(handler):
    data = b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}'
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def test_proxy_from_the_environment(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server, root, seen = _recording_server(_ok)
    try:
        monkeypatch.setenv("http_proxy", root)
        completion, _ = run(complete_once("http://llm.internal:8000/v1", max_retries=0))
        assert completion.text == "ok" and seen == [("POST", "http://llm.internal:8000/v1/chat/completions")]
        monkeypatch.setenv("no_proxy", "127.0.0.1")  # the server itself, reached directly
        run(complete_once(f"{root}/v1", max_retries=0))
        assert seen[-1] == ("POST", "/v1/chat/completions")
    finally:
        server.shutdown()
        server.server_close()


def test_redirect_is_an_error_not_a_get():
    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", "/elsewhere")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server, root, seen = _recording_server(redirect)
    try:
        with pytest.raises(LLMError) as error:
            run(complete_once(f"{root}/v1"))
        assert error.value.status == 302 and seen == [("POST", "/v1/chat/completions")]
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_with_a_line_break_is_refused():
    with pytest.raises(ValueError, match="line break"):
        ChatClient("http://127.0.0.1:9/v1", "m", api_key="sk-abc\n")


def test_max_concurrency_limits_requests_in_flight():
    tracked, peak = counting(lambda messages: "ok")

    async def many(url):
        async with ChatClient(url, "m", max_concurrency=3) as client:
            await asyncio.gather(*(client.complete(USER) for _ in range(12)))

    with serve_scripted(tracked) as server:
        run(many(server.base_url))
    assert 2 <= peak[0] <= 3  # never more than 3; usually exactly 3


# -- health checks and vLLM -------------------------------------------------------------------------------------


def test_wait_until_healthy_on_a_running_server():
    with serve_scripted(echo) as server:
        wait_until_healthy(server.base_url, timeout=5)
        wait_until_healthy(server.root_url, timeout=5)


def test_wait_until_healthy_falls_back_to_models():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status = 200 if self.path == "/v1/models" else 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        wait_until_healthy(f"http://127.0.0.1:{server.server_address[1]}/v1", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_until_healthy_times_out():
    start = time.perf_counter()
    with pytest.raises(ServerStartError, match="not healthy after 0.3 s"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}/v1", timeout=0.3)
    assert time.perf_counter() - start < 2


def test_wait_until_healthy_reports_an_exited_process_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with log.open("w") as f:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('CUDA out of memory', flush=True); sys.exit(3)"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    with pytest.raises(ServerStartError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}", timeout=30, process=process, log_file=log)


def test_vllm_serve_command():
    command = vllm_serve_command(
        "Qwen/Qwen3-8B",
        port=9000,
        host="0.0.0.0",
        tensor_parallel_size=2,
        data_parallel_size=4,
        max_model_len=32768,
        gpu_memory_utilization=0.85,
        served_model_name="policy",
        extra_args=["--enable-prefix-caching"],
    )
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen3-8B"]
    flags = dict(zip(command[3:-1:2], command[4:-1:2]))
    assert flags == {
        "--host": "0.0.0.0",
        "--port": "9000",
        "--tensor-parallel-size": "2",
        "--data-parallel-size": "4",
        "--max-model-len": "32768",
        "--gpu-memory-utilization": "0.85",
        "--served-model-name": "policy",
    }
    assert command[-1] == "--enable-prefix-caching"
    assert "--served-model-name" not in vllm_serve_command("m")


def test_start_vllm_server_without_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(ImportError, match=r"pip install entropo-trl\[vllm\]"):
        start_vllm_server("Qwen/Qwen3-8B", timeout=1)


FAKE_VLLM = """#!{python}
import http.server, sys
args = sys.argv[1:]
assert args[0] == "serve", args
port = int(args[args.index("--port") + 1])
print("fake vllm serving", args[1], flush=True)
if "--fail" in args:
    sys.exit("engine core failed to start")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_start_vllm_server_with_a_fake_vllm(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    port = free_port()
    log = tmp_path / "vllm.log"
    with start_vllm_server("tiny", port=port, log_file=log, timeout=30, served_model_name="policy") as server:
        assert server.base_url == f"http://127.0.0.1:{port}/v1" and server.model == "policy"
        assert server.process.poll() is None
        wait_until_healthy(server.base_url, timeout=5)
    assert server.process.poll() is not None  # stopped with its process group
    assert "fake vllm serving tiny" in log.read_text()

    with pytest.raises(ServerStartError, match=r"exited with code 1(.|\n)*engine core failed"):
        start_vllm_server("tiny", port=free_port(), log_file=log, timeout=30, extra_args=["--fail"])


# -- transformers backend ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer("qwen3")
    return tok, build_tiny_model(tok)


def test_transformers_backend_completion(tiny_lm):
    tok, model = tiny_lm
    messages = [{"role": "system", "content": "You are a programming agent."}, *USER]
    prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]
    sampling = SamplingParams(max_tokens=8, seed=0)
    with serve_transformers(model, tok, model_name="tiny") as server:
        assert server.model == "tiny"
        first, usage = run(complete_once(server.base_url, messages, sampling))
        again, _ = run(complete_once(server.base_url, messages, sampling))
        greedy, _ = run(complete_once(server.base_url, messages, SamplingParams(temperature=0.0, max_tokens=8)))
    assert first.prompt_tokens == len(prompt_ids)
    assert 1 <= first.completion_tokens <= 8
    assert first.finish_reason in ("stop", "length")
    if first.finish_reason == "length":
        assert first.completion_tokens == 8
    assert usage["prompt_tokens"] == first.prompt_tokens and usage["completion_tokens"] == first.completion_tokens
    assert again.text == first.text  # same seed, same sample
    assert greedy.prompt_tokens == len(prompt_ids) and greedy.completion_tokens <= 8


def test_transformers_backend_greedy_matches_generate(tiny_lm):
    import torch

    tok, model = tiny_lm
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    with serve_transformers(model, tok) as server:
        completion, _ = run(complete_once(server.base_url, sampling=SamplingParams(temperature=0.0, max_tokens=6)))
    assert completion.text == expected


def test_transformers_backend_from_a_path_with_stop_strings(tiny_lm, tmp_path):
    tok, model = tiny_lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    with serve_transformers(model, tok) as server:
        expected, _ = run(complete_once(server.base_url, sampling=greedy))
    with serve_transformers(str(tmp_path)) as server:
        assert server.model == str(tmp_path)
        completion, _ = run(complete_once(server.base_url, sampling=greedy))
        stop = expected.text[len(expected.text) // 2 :][:2]
        cut, _ = run(
            complete_once(server.base_url, sampling=SamplingParams(temperature=0.0, max_tokens=8, stop=[stop]))
        )
    assert completion.text == expected.text
    assert cut.text == expected.text[: expected.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens == len(tok(cut.text, add_special_tokens=False)["input_ids"])
