"""The in-process OpenAI servers against careless or hostile clients, over raw sockets on 127.0.0.1: malformed or
missing `Content-Length`, bodies too large or cut short, many idle connections, pipelined requests. Every socket has a
timeout, so a server that hangs fails a test instead of blocking the run."""

import json
import socket
import threading
import time

import pytest

from entropo_trl.rollout.serve import openai_http, serve_scripted, serve_transformers

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def echo(messages):
    return "echo: " + messages[-1]["content"]


def connect(server, timeout: float = 5.0) -> socket.socket:
    host, port = server.root_url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def post(body: bytes = BODY, length: str | None = None, extra: str = "") -> bytes:
    """A raw chat request; `length` replaces the `Content-Length` value (`""`: no header at all)."""
    length = str(len(body)) if length is None else length
    header = f"Content-Length: {length}\r\n" if length != "" else ""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{header}{extra}\r\n"
    return head.encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from `sock`: status, headers (lower-case names), body. Reads no further than its end, so
    that pipelined responses can be read one after the other."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed before a response: {head!r}"
        head += byte
    head, rest = head[:-4], b""
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(length - len(rest))
        assert chunk, "connection closed in the middle of a response"
        rest += chunk
    return status, headers, rest


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    "length, extra",
    [("abc", ""), ("-5", ""), ("", ""), ("1e3", ""), (" 12 x", ""), ("5", "Content-Length: 6\r\n")],
    ids=["not a number", "negative", "missing", "float", "garbage", "two different"],
)
def test_bad_content_length_is_a_400_then_a_clean_close(length, extra):
    with serve_scripted(echo) as server:
        with connect(server) as sock:
            sock.sendall(post(length=length, extra=extra))
            status, headers, body = read_response(sock)
            assert status == 400 and headers["connection"] == "close"
            assert "Content-Length" in json.loads(body)["error"]["message"]
            assert closed_by_server(sock)
        with connect(server) as sock:  # the server is fine afterwards
            sock.sendall(post())
            assert read_response(sock)[0] == 200
        assert len(server.requests) == 1


def test_chunked_body_is_refused():
    with serve_scripted(echo) as server, connect(server) as sock:
        sock.sendall(post(length="", extra="Transfer-Encoding: chunked\r\n"))
        status, _, body = read_response(sock)
        assert status == 400 and "chunked" in json.loads(body)["error"]["message"]


def test_body_over_the_limit_is_a_413_without_reading_it(monkeypatch):
    monkeypatch.setattr(openai_http, "MAX_REQUEST_BYTES", 1000)
    with serve_scripted(echo) as server:
        with connect(server) as sock:
            sock.sendall(post(length="10000000000"))  # announced, never sent
            status, headers, body = read_response(sock)
            assert status == 413 and headers["connection"] == "close" and "1000 bytes" in body.decode()
            assert closed_by_server(sock)
        with connect(server) as sock:
            big = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode()
            sock.sendall(post(big))  # sent in full: the answer still arrives before the close
            assert read_response(sock)[0] == 413
        with connect(server) as sock:
            sock.sendall(post())  # under the limit
            assert read_response(sock)[0] == 200
        assert len(server.requests) == 1


def test_short_body_times_out_with_408_and_frees_its_thread(monkeypatch):
    monkeypatch.setattr(openai_http, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(openai_http, "MAX_WORKERS", 1)  # the one worker must come back for the next client
    with serve_scripted(echo) as server:
        with connect(server) as sock:
            start = time.monotonic()
            sock.sendall(post(length=str(len(BODY) + 50)))  # 50 bytes promised, never sent
            status, headers, _ = read_response(sock)
            assert status == 408 and headers["connection"] == "close"
            assert time.monotonic() - start < 3
        with connect(server) as sock:
            sock.sendall(post())
            assert read_response(sock)[0] == 200


def test_a_client_that_leaves_mid_body_does_not_hold_a_worker(monkeypatch):
    monkeypatch.setattr(openai_http, "MAX_WORKERS", 1)
    with serve_scripted(echo) as server:
        with connect(server) as sock:
            sock.sendall(post()[:-10])
        with connect(server) as sock:
            sock.sendall(post())
            assert read_response(sock)[0] == 200


def test_idle_connections_hold_no_thread(monkeypatch):
    monkeypatch.setattr(openai_http, "MAX_WORKERS", 4)
    with serve_scripted(echo) as server:
        before = threading.active_count()
        sockets = [connect(server) for _ in range(40)]
        try:
            for sock in sockets[:20]:  # half of them make one request, then stay open and idle
                sock.sendall(post())
            for sock in sockets[:20]:
                assert read_response(sock)[0] == 200
            time.sleep(0.2)
            assert threading.active_count() - before <= 4
            for sock in reversed(sockets):  # every connection is still served, in any order
                sock.sendall(post())
                assert read_response(sock)[0] == 200
            assert threading.active_count() - before <= 4
        finally:
            for sock in sockets:
                sock.close()


def test_requests_run_in_parallel_up_to_the_worker_limit(monkeypatch):
    monkeypatch.setattr(openai_http, "MAX_WORKERS", 3)
    active, peak, lock = [0], [0], threading.Lock()

    def slow(messages):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return "ok"

    with serve_scripted(slow) as server:
        sockets = [connect(server) for _ in range(6)]
        for sock in sockets:
            sock.sendall(post())
        assert [read_response(sock)[0] for sock in sockets] == [200] * 6
        for sock in sockets:
            sock.close()
    assert peak[0] == 3


def test_connection_limit_closes_the_longest_idle_one(monkeypatch):
    monkeypatch.setattr(openai_http, "MAX_CONNECTIONS", 3)
    with serve_scripted(echo) as server:
        sockets = []
        for _ in range(3):
            sock = connect(server)
            sock.sendall(post())
            assert read_response(sock)[0] == 200
            sockets.append(sock)
        newest = connect(server)
        newest.sendall(post())
        assert read_response(newest)[0] == 200
        assert closed_by_server(sockets[0])  # the longest idle made room
        for sock in (*sockets, newest):
            sock.close()


def test_idle_keepalive_connections_expire(monkeypatch):
    monkeypatch.setattr(openai_http, "KEEPALIVE_TIMEOUT", 0.3)
    with serve_scripted(echo) as server, connect(server) as sock:
        sock.sendall(post())
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        assert closed_by_server(sock) and time.monotonic() - start < 3


def test_pipelined_requests_are_all_answered():
    with serve_scripted(echo) as server, connect(server) as sock:
        sock.sendall(post() + post() + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [read_response(sock)[0] for _ in range(3)] == [200, 200, 200]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000, "not JSON"),
        (b"{nope", "not JSON"),
        (b'{"messages": "hi"}', "messages"),
        (json.dumps({"messages": [], "n": "2"}).encode(), "n=1"),
    ],
    ids=["deeply nested", "invalid", "messages not a list", "n a string"],
)
def test_bad_bodies_are_a_400_and_the_connection_stays_usable(body, message):
    with serve_scripted(echo) as server, connect(server) as sock:
        sock.sendall(post(body))
        status, _, answer = read_response(sock)
        assert status == 400 and message in json.loads(answer)["error"]["message"]
        sock.sendall(post())
        assert read_response(sock)[0] == 200


def test_only_the_last_request_bodies_are_kept():
    with serve_scripted(echo, keep_requests=2) as server:
        for i in range(5):
            with connect(server) as sock:
                body = json.dumps({"messages": [{"role": "user", "content": str(i)}]}).encode()
                sock.sendall(post(body))
                assert read_response(sock)[0] == 200
        assert [r["messages"][0]["content"] for r in server.requests] == ["3", "4"]
    with serve_scripted(echo) as server:
        assert server.requests.maxlen == 256


def test_transformers_server_keeps_no_request_bodies():
    from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer("qwen3")
    with serve_transformers(build_tiny_model(tok), tok) as server, connect(server, timeout=60) as sock:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        sock.sendall(post(body))
        assert read_response(sock)[0] == 200
        sock.sendall(post(length="-1"))
        assert read_response(sock)[0] == 400
        assert len(server.requests) == 0


def test_stop_returns_with_clients_idle_and_mid_body(monkeypatch):
    monkeypatch.setattr(openai_http, "REQUEST_TIMEOUT", 60.0)
    server = serve_scripted(echo)
    idle, stuck = connect(server), connect(server)
    idle.sendall(post())
    assert read_response(idle)[0] == 200
    stuck.sendall(post()[:-5])
    time.sleep(0.1)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5
    assert closed_by_server(idle) and closed_by_server(stuck)
    idle.close()
    stuck.close()
