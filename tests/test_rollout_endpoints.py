"""Several endpoints behind one client: rendezvous picks, `X-Session-ID`, back-off and failover, in the client and in
the rollout runner (against small chat endpoints on 127.0.0.1 that log the session id of every request)."""

import asyncio
import collections
import http.server
import json
import threading

import pytest

from entropo_trl.data.readers import read_trajectories
from entropo_trl.rollout.client import ChatClient, LLMError
from entropo_trl.rollout.endpoints import EndpointPool, parse_endpoints, rendezvous_order
from entropo_trl.rollout.pool import errors_path
from entropo_trl.rollout.runner import RolloutConfig, run_rollouts
from entropo_trl.rollout.scaffold import Action
from entropo_trl.rollout.toy import make_toy_tasks

USER = [{"role": "user", "content": "Fix the bug in parse()."}]


def looper(messages):
    return Action("execute_bash", {"cmd": "ls"}, "Looking around.").to_text()


class Endpoint:
    """A chat endpoint on 127.0.0.1 (HTTP/1.0: one connection per request). It logs the `X-Session-ID` of every
    request it answers in `served`, answers HTTP `status` while that is set, and after `stop()` refuses connections.
    With `answers`, it stops itself once it has answered that many requests."""

    def __init__(self, respond=looper, answers=None):
        self.served: list[str | None] = []
        self.failed = 0  # requests answered with `status`
        self.status: int | None = None
        lock, endpoint = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    status = endpoint.status
                    if status is None:
                        endpoint.served.append(self.headers.get("X-Session-ID"))
                        last = answers is not None and len(endpoint.served) == answers
                    else:
                        endpoint.failed += 1
                text = respond(body["messages"]) if status is None else "overloaded"
                data = json.dumps(
                    {
                        "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                    }
                ).encode()
                self.send_response(status or 200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if status is None and last:
                    threading.Thread(target=endpoint.stop, daemon=True).start()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.stopped = threading.Event()
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        if not self.stopped.is_set():
            self.stopped.set()
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def endpoints():
    made = []

    def make(*args, **kwargs):
        made.append(Endpoint(*args, **kwargs))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.stop()


def _session_for(first: str, endpoints: list[str]) -> str:
    """A session id whose rendezvous order starts with `first`."""
    return next(f"s{k}" for k in range(1000) if rendezvous_order(endpoints, f"s{k}")[0] == first)


# -- selection ---------------------------------------------------------------------------------------------------


def test_parse_endpoints_takes_one_url_a_comma_list_or_a_sequence():
    assert parse_endpoints("http://a:1/v1/") == ("http://a:1/v1",)
    assert parse_endpoints("http://a:1/v1, http://b:1/v1/") == ("http://a:1/v1", "http://b:1/v1")
    assert parse_endpoints(["http://a:1/v1", "http://b:1/v1"]) == ("http://a:1/v1", "http://b:1/v1")
    for bad in ("", "http://a:1/v1,,http://b:1/v1", []):
        with pytest.raises(ValueError, match="one endpoint or several"):
            parse_endpoints(bad)
    with pytest.raises(ValueError, match="more than once: http://a:1/v1"):
        parse_endpoints("http://a:1/v1,http://a:1/v1/")


def test_rendezvous_order_is_stable_spread_and_moves_only_the_sessions_of_a_removed_endpoint():
    urls = ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]
    # a fixed value: the order is the same in every process (blake2b, not Python's salted `hash`)
    assert rendezvous_order(urls, "django__django-11099/policy/0") == [urls[2], urls[1], urls[0]]
    sessions = [f"astropy__astropy-{k}/policy/{k % 16}" for k in range(3000)]
    firsts = [rendezvous_order(urls, s)[0] for s in sessions]
    assert firsts == [rendezvous_order(list(reversed(urls)), s)[0] for s in sessions]  # the list order is irrelevant
    counts = collections.Counter(firsts)
    assert all(900 <= counts[url] <= 1100 for url in urls), counts  # 1000 each expected, sd ~26
    without_b = [rendezvous_order([urls[0], urls[2]], s)[0] for s in sessions]
    for session, first, now in zip(sessions, firsts, without_b):
        expected = first if first != urls[1] else rendezvous_order(urls, session)[1]  # b's sessions: their next one
        assert now == expected


def test_back_off_doubles_up_to_the_cap_counts_an_outage_once_and_resets_on_success():
    now = [0.0]
    pool = EndpointPool(["a", "b"], backoff=30.0, max_backoff=100.0, clock=lambda: now[0])
    session = _session_for("a", ["a", "b"])
    assert pool.order(session) == ["a", "b"]
    pool.failed("a")
    pool.failed("a")  # the same outage, seen by another request in flight: not a second one
    assert pool.order(session) == ["b", "a"]  # out of rotation: last, tried only if b fails too
    for down_for in (30.0, 60.0, 100.0, 100.0):  # then 2x per outage in a row, up to the cap
        now[0] += down_for - 0.01
        assert not pool.in_rotation("a")
        now[0] += 0.01
        assert pool.in_rotation("a") and pool.order(session) == ["a", "b"]
        pool.failed("a")
    pool.succeeded("a")
    assert pool.in_rotation("a")
    pool.failed("a")
    now[0] += 30.0
    assert pool.in_rotation("a")  # back to the first back-off after an answer
    with pytest.raises(ValueError, match="endpoint_backoff"):
        EndpointPool(["a"], backoff=0)


# -- the client --------------------------------------------------------------------------------------------------


def test_every_request_of_a_session_reaches_its_endpoint_with_its_session_id(endpoints):
    one, two = endpoints(), endpoints()
    sessions = [f"toy__toolkit-{k}/policy/{k % 4}" for k in range(40)]

    async def go():
        async with ChatClient(f"{one.url},{two.url}", "m") as client:
            turns = [client.complete(USER, session_id=s) for s in sessions for _ in range(3)]
            completions = await asyncio.gather(*turns)
            plain = [await client.complete(USER) for _ in range(4)]
        return completions, plain

    completions, plain = asyncio.run(go())
    by_url = {one.url: one, two.url: two}
    for k, session in enumerate(sessions):
        expected = rendezvous_order([one.url, two.url], session)[0]
        assert {c.endpoint for c in completions[3 * k : 3 * k + 3]} == {expected}
        assert by_url[expected].served.count(session) == 3
    assert len(one.served) >= 30 and len(two.served) >= 30  # both get work (60 expected each)
    # without a session id: round robin, and no header
    assert [c.endpoint for c in plain] == [one.url, two.url, one.url, two.url]
    assert one.served.count(None) == two.served.count(None) == 2


def test_a_failing_endpoint_is_backed_off_its_sessions_move_and_it_is_tried_again_afterwards(endpoints):
    first, second = endpoints(), endpoints()
    first.status = 503
    urls = [first.url, second.url]
    session = _session_for(first.url, urls)

    async def go():
        async with ChatClient(urls, "m", max_retries=1, backoff=0.01, endpoint_backoff=0.5) as client:
            moved = await client.complete(USER, session_id=session)
            failed_once = first.failed
            still_moved = await client.complete(USER, session_id=session)  # no request to the backed-off one
            skipped = first.failed == failed_once
            first.status = None
            await asyncio.sleep(0.6)
            back = await client.complete(USER, session_id=session)
            return moved, failed_once, still_moved, skipped, back

    moved, failed_once, still_moved, skipped, back = asyncio.run(go())
    assert moved.endpoint == still_moved.endpoint == second.url and moved.text.startswith("Looking around")
    assert failed_once == 2 and skipped  # the first attempt and its retry, then out of rotation
    assert back.endpoint == first.url and first.served == [session]
    assert second.served == [session, session]


def test_every_endpoint_out_of_rotation_is_still_tried_before_giving_up(endpoints):
    first, second = endpoints(), endpoints()
    first.status = second.status = 502
    urls = [first.url, second.url]
    session = _session_for(first.url, urls)

    async def go():
        async with ChatClient(urls, "m", max_retries=0, backoff=0.01, endpoint_backoff=60.0) as client:
            with pytest.raises(LLMError, match="all 2 endpoints failed the request.*HTTP 502") as error:
                await client.complete(USER, session_id=session)
            second.status = None  # back, though still in its back-off: a last resort is better than an error
            completion = await client.complete(USER, session_id=session)
            return error.value, completion

    error, completion = asyncio.run(go())
    assert error.status == 502 and completion.endpoint == second.url
    assert first.failed == 2 and second.failed == 1


def test_a_4xx_answer_is_not_an_endpoint_failure(endpoints):
    first, second = endpoints(), endpoints()
    first.status = 400
    urls = [first.url, second.url]
    session = _session_for(first.url, urls)

    async def go():
        async with ChatClient(urls, "m", max_retries=3, backoff=0.01) as client:
            with pytest.raises(LLMError, match="HTTP 400") as error:
                await client.complete(USER, session_id=session)
            return error.value, client.endpoints.in_rotation(first.url)

    error, in_rotation = asyncio.run(go())
    assert error.status == 400 and in_rotation
    assert first.failed == 1 and second.served == []  # not retried, not moved


def test_a_session_id_that_cannot_be_a_header_is_refused():
    async def go():
        async with ChatClient("http://127.0.0.1:9/v1", "m") as client:
            await client.complete(USER, session_id="a\r\nX-Evil: 1")

    with pytest.raises(ValueError, match="session id"):
        asyncio.run(go())


# -- the runner --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    return make_toy_tasks(tmp_path_factory.mktemp("toy"), n=3)


def _rollouts(tasks, urls, pool, **config):
    async def go():
        async with ChatClient(urls, "scripted", max_retries=1, backoff=0.01) as client:
            config.setdefault("oracle", False)
            return await run_rollouts(tasks, client, pool, RolloutConfig(**config), progress=False)

    return asyncio.run(go())


def test_stopping_an_endpoint_mid_run_moves_its_episodes_and_they_say_so(toy_tasks, tmp_path, endpoints):
    # `going` answers one request, then refuses connections: the episode it answered has two steps left
    going, staying = endpoints(answers=1), endpoints()
    urls = [going.url, staying.url]
    pool = tmp_path / "pool.jsonl"
    summary = _rollouts(toy_tasks, urls, pool, n=4, concurrency=12, max_steps=3)
    assert summary.ran == 12 and summary.errors == 0
    trajectories = list(read_trajectories(pool))
    assert sorted(t.episode_id for t in trajectories) == sorted({t.episode_id for t in trajectories})
    hashed_to = {t.episode_id: rendezvous_order(urls, t.episode_id)[0] for t in trajectories}
    assert set(hashed_to.values()) == set(urls)  # both endpoints had episodes
    for t in trajectories:
        assert t.num_steps == 3 and t.exit_reason == "max_step_limit"  # the moved ones finished too
        assert t.metadata["endpoint"] == staying.url
        served_by_going = going.served.count(t.episode_id)
        if served_by_going:
            assert hashed_to[t.episode_id] == going.url and t.metadata["moved_endpoints"] == urls
            assert staying.served.count(t.episode_id) == 3 - served_by_going
        else:
            assert "moved_endpoints" not in t.metadata and staying.served.count(t.episode_id) == 3
    assert len(going.served) >= 1 and sum("moved_endpoints" in t.metadata for t in trajectories) >= 1


def test_every_endpoint_down_records_errors_and_no_trajectory(toy_tasks, tmp_path, endpoints):
    first, second = endpoints(), endpoints()
    first.stop()
    second.stop()
    pool = tmp_path / "pool.jsonl"
    summary = _rollouts(toy_tasks[:2], [first.url, second.url], pool, n=2, max_steps=3)
    assert summary.ran == 0 and summary.errors == 4
    assert not pool.exists() or not pool.read_text()
    lines = [json.loads(line) for line in errors_path(pool).read_text().splitlines()]
    assert len(lines) == 4 and all(line["error"].startswith("LLMError: all 2 endpoints failed") for line in lines)


def test_one_endpoint_records_it_and_sends_the_episode_id(toy_tasks, tmp_path, endpoints):
    only = endpoints()
    pool = tmp_path / "pool.jsonl"
    assert _rollouts(toy_tasks[:1], only.url, pool, n=2, max_steps=2).ran == 2
    trajectories = list(read_trajectories(pool))
    for t in trajectories:
        assert t.metadata["endpoint"] == only.url and "moved_endpoints" not in t.metadata
    assert sorted(only.served) == sorted(t.episode_id for t in trajectories for _ in range(2))
