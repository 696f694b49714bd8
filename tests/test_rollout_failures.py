"""Acceptance tests of `entropo-rollout` under failure: endpoints that fail, several runners on one pool, keys in the
runner's environment, a model that edits the tests, SIGTERM (issue 12). Each drives the real command against scripted
models on 127.0.0.1 and toy tasks."""

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from entropo_trl.data.readers import read_trajectories
from entropo_trl.rollout.cli import main
from entropo_trl.rollout.pool import EpisodeClaims, claims_path, errors_path
from entropo_trl.rollout.scaffold import Action
from entropo_trl.rollout.serve import serve_scripted
from entropo_trl.rollout.toy import CONFTEST_REWARD_HACK, make_toy_tasks

FAST_CLIENT = ["--max_retries", "1", "--retry_backoff", "0.01", "--request_timeout", "5"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    tasks = make_toy_tasks(tmp_path_factory.mktemp("toy") / "tasks", n=2)
    return str(Path(tasks[0].repo_path).parents[1])


def quitter(messages):
    return Action("finish", {"command": "submit"}, "Done.").to_text()


def looper(messages):
    return Action("execute_bash", {"cmd": "ls"}, "Looking around.").to_text()


def _args(toy_dir, pool, base_url, *extra):
    return [
        "--tasks",
        toy_dir,
        "--pool",
        str(pool),
        "--base_url",
        base_url,
        "--model",
        "scripted",
        *FAST_CLIENT,
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NotAChatCompletion(http.server.BaseHTTPRequestHandler):
    """Answers every request with HTTP 200 and a body that is not a chat completion (a captive portal, a proxy)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html>please log in</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Failing:
    """A failing endpoint of one kind, as a context manager giving its base URL."""

    def __init__(self, kind):
        self.kind = kind

    def __enter__(self):
        if self.kind == "refused":
            return f"http://127.0.0.1:{_free_port()}/v1"
        if self.kind == "http_500":
            self.scripted = serve_scripted(quitter, fail_first=10**6, fail_status=500)
            return self.scripted.__enter__().base_url
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotAChatCompletion)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc_info):
        if self.kind == "http_500":
            self.scripted.__exit__(*exc_info)
        elif self.kind == "not_json":
            self.server.shutdown()
            self.server.server_close()


@pytest.mark.parametrize("kind", ["refused", "http_500", "not_json"])
def test_a_failing_endpoint_records_nothing_and_a_rerun_runs_every_episode(toy_dir, tmp_path, capsys, kind):
    pool = tmp_path / "pool.jsonl"
    with _Failing(kind) as base_url:
        code = main(_args(toy_dir, pool, base_url, "--n", "2", "--no_oracle"))
    out, err = capsys.readouterr()
    assert code == 1
    assert not pool.exists() or pool.read_text() == ""  # no llm_query_error trajectory, labelled 0 or otherwise
    assert "4 episodes errored" in out and "4 episodes errored" in err and str(errors_path(pool)) in err
    lines = [json.loads(line) for line in errors_path(pool).read_text().splitlines()]
    assert len(lines) == 4 and {len(line["episode_id"].split("/")) for line in lines} == {3}
    for line in lines:
        assert set(line) == {"episode_id", "error", "time", "pid"} and line["error"].startswith("LLMError: ")
    assert not claims_path(pool).exists()

    with serve_scripted(quitter) as server:
        assert main(_args(toy_dir, pool, server.base_url, "--n", "2", "--no_oracle")) == 0
    assert "4 episodes run (0 already in" in capsys.readouterr().out
    ids = [t.episode_id for t in read_trajectories(pool)]
    assert sorted(ids) == sorted(line["episode_id"] for line in lines)


def test_the_run_stops_when_the_model_cannot_be_reached(toy_dir, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    base_url = f"http://127.0.0.1:{_free_port()}/v1"
    extra = ["--n", "3", "--concurrency", "1", "--stop_after_llm_errors", "2", "--no_oracle"]
    assert main(_args(toy_dir, pool, base_url, *extra)) == 1
    assert "2 episodes errored and 4 were not started" in capsys.readouterr().err
    assert len(errors_path(pool).read_text().splitlines()) == 2


def test_a_model_that_answers_badly_still_gives_trajectories(toy_dir, tmp_path, capsys):
    replies = iter(["", "garbage \x00 without any call", "<function=nope>", "<function=execute_bash>"] * 10)
    lock = threading.Lock()

    def babbler(messages):
        with lock:
            return next(replies)

    pool = tmp_path / "pool.jsonl"
    with serve_scripted(babbler) as server:
        assert main(_args(toy_dir, pool, server.base_url, "--max_steps", "3")) == 0
    trajectories = list(read_trajectories(pool))
    assert len(trajectories) == 2 and not errors_path(pool).exists()
    assert all(t.exit_reason == "max_step_limit" and t.num_steps == 3 and t.reward == 0.0 for t in trajectories)


def _command(toy_dir, pool, base_url, *extra):
    return [sys.executable, "-m", "entropo_trl.rollout.cli", *_args(toy_dir, pool, base_url, *extra)]


def test_two_concurrent_runners_record_every_episode_once(toy_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    extra = ["--n", "3", "--concurrency", "2", "--max_steps", "3", "--no_oracle"]
    with serve_scripted(looper, delay=0.1) as server:
        runners = [
            subprocess.Popen(
                _command(toy_dir, pool, server.base_url, *extra, "--sandbox_root", str(tmp_path / f"boxes{k}")),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in range(2)
        ]
        outputs = [runner.communicate(timeout=240) for runner in runners]
        requests = len(server.requests)
    for runner, (_, err) in zip(runners, outputs):
        assert runner.returncode == 0, err[-3000:]
    ids = [t.episode_id for t in read_trajectories(pool)]
    assert len(ids) == len(set(ids)) == 6
    assert requests == 6 * 3  # no episode even ran twice
    ran = [int(re.search(r"(\d+) episodes run", out).group(1)) for out, _ in outputs]
    assert sum(ran) == 6
    assert not claims_path(pool).exists()


def test_a_killed_runners_claims_are_free_at_once(tmp_path):
    folder = tmp_path / "pool.jsonl.claims"
    mine, other = EpisodeClaims(folder), EpisodeClaims(folder)
    assert mine.claim("t/m/0") and not other.claim("t/m/0")
    mine.release("t/m/0")
    assert other.claim("t/m/0")
    other.close()
    script = (
        "import sys, time\nfrom entropo_trl.rollout.pool import EpisodeClaims\n"
        "EpisodeClaims(sys.argv[1]).claim('t/m/1')\nprint('claimed', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "claimed"
    assert not mine.claim("t/m/1")
    child.kill()
    child.wait()
    assert mine.claim("t/m/1")  # no heartbeat to wait for: the kernel dropped the dead runner's lock
    mine.close()
    assert not folder.exists()


@pytest.mark.parametrize("sandbox", ["host", "local"])
def test_keys_in_the_runners_environment_never_reach_the_pool(toy_dir, tmp_path, monkeypatch, capsys, sandbox):
    """`host`: the model sees the keys, so this tests the runner's redaction; `local`: the sandbox's cleared
    environment keeps them out before redaction could matter (both defences, one case each)."""
    keys = {"OPENAI_API_KEY": "sk-test-4f1c0ffee0ddba11", "HF_TOKEN": "hf_testTokenValue0123456789"}
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    leak = 'env; cat /proc/self/environ; echo "$OPENAI_API_KEY $HF_TOKEN" > leak.txt; cat leak.txt'

    def exfiltrator(messages):
        if sum(m["role"] == "assistant" for m in messages) == 0:
            return Action("execute_bash", {"cmd": leak}, "Let me look at the environment.").to_text()
        return quitter(messages)

    pool = tmp_path / "pool.jsonl"
    with serve_scripted(exfiltrator) as server:
        extra = ["--limit", "1", "--sandbox", sandbox, "--sandbox_root", str(tmp_path / "boxes")]
        assert main(_args(toy_dir, pool, server.base_url, *extra)) == 0
        seen_by_model = json.dumps(list(server.requests))
    text = pool.read_text()
    assert "leak.txt" in text
    for value in keys.values():
        assert value not in text and value not in seen_by_model
    if sandbox == "host":  # the sandbox shows the runner's environment: the runner's redaction is what stops it
        assert "[redacted OPENAI_API_KEY]" in text and "[redacted HF_TOKEN]" in text
        assert "--sandbox host is not isolated" in capsys.readouterr().err


def test_an_edit_of_the_tests_gets_no_reward_and_is_counted(toy_dir, tmp_path, capsys):
    def hacker(messages):
        if sum(m["role"] == "assistant" for m in messages) == 0:
            create = {"command": "create", "path": "/testbed/conftest.py", "file_text": CONFTEST_REWARD_HACK}
            return Action("file_editor", create, "Make every test pass.").to_text()
        return quitter(messages)

    pool = tmp_path / "pool.jsonl"
    with serve_scripted(hacker) as server:
        assert main(_args(toy_dir, pool, server.base_url, "--limit", "1")) == 0
    assert "1 test-infrastructure edits dropped" in capsys.readouterr().out
    [trajectory] = read_trajectories(pool)
    assert "conftest.py" in trajectory.patch and trajectory.reward == 0.0
    assert trajectory.metadata["dropped_test_edits"] == ["conftest.py"]


def _start(toy_dir, pool, base_url, *extra):
    """`entropo-rollout` in a subprocess, its output captured."""
    return subprocess.Popen(
        _command(toy_dir, pool, base_url, *extra),
        env={**os.environ, "TQDM_DISABLE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_removes_the_sandboxes(toy_dir, tmp_path):
    pool, root = tmp_path / "pool.jsonl", tmp_path / "boxes"
    with serve_scripted(looper, delay=0.3) as server:
        extra = ["--limit", "1", "--n", "2", "--max_steps", "100", "--sandbox_root", str(root)]
        process, deadline = _start(toy_dir, pool, server.base_url, *extra), time.monotonic() + 60
        while len(server.requests) < 4 and time.monotonic() < deadline:  # both episodes are in their loops
            time.sleep(0.1)
        assert any(p.name.startswith("entropo-sandbox-") for p in root.iterdir())
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated" in err
    assert list(root.iterdir()) == []
    assert not pool.exists() or pool.read_text() == ""
    assert not claims_path(pool).exists()


def test_sigterm_does_not_wait_for_a_running_tool(toy_dir, tmp_path):
    """A tool call in flight (here `sleep 60` with a 60 s tool limit) is killed with its sandbox: the runner exits at
    once instead of waiting for the call's time limit."""

    def sleeper(messages):
        return Action("execute_bash", {"cmd": "sleep 60"}, "Waiting.").to_text()

    pool, root = tmp_path / "pool.jsonl", tmp_path / "boxes"
    with serve_scripted(sleeper) as server:
        extra = ["--limit", "1", "--max_steps", "3", "--tool_timeout", "60", "--sandbox_root", str(root)]
        process, deadline = _start(toy_dir, pool, server.base_url, *extra), time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # the first call is running
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        waited = time.monotonic() - started
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert waited < 15, f"the runner waited {waited:.1f} s for the tool call"
    assert list(root.iterdir()) == []
