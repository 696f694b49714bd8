"""The real `entropo-rollout` command against a scripted hostile model on 127.0.0.1, with the isolated local sandbox:
the runner's secrets never reach the pool, writes outside the checkout and connections to the host fail, and special
files end within the tool limit."""

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from entropo_trl.data.readers import read_trajectories
from entropo_trl.rollout.cli import main
from entropo_trl.rollout.scaffold import Action
from entropo_trl.rollout.serve import serve_scripted
from entropo_trl.rollout.toy import make_toy_tasks

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

SECRETS = {"OPENAI_API_KEY": "sk-isolation-test-0123456789", "HF_TOKEN": "hf_isolation_test_0123456789"}


def hostile(token: str, port: int):
    """A model that looks for secrets, writes outside its checkout, calls the host and opens special files."""
    steps = [
        ("execute_bash", {"cmd": "env; tr '\\0' '\\n' < /proc/self/environ; cat /proc/$PPID/environ"}),
        ("execute_bash", {"cmd": f"echo x > /tmp/escape-{token}; echo y > /testbed/../escape-{token}"}),
        ("file_editor", {"command": "create", "path": f"/tmp/escape-editor-{token}", "file_text": "x"}),
        ("file_editor", {"command": "create", "path": f"/testbed/../escape-editor-{token}", "file_text": "x"}),
        ("execute_bash", {"cmd": f"python -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 3)\""}),
        ("execute_bash", {"cmd": f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"}),
        ("execute_bash", {"cmd": "mkfifo /testbed/fifo"}),
        ("file_editor", {"command": "view", "path": "/testbed/fifo"}),
        ("file_editor", {"command": "view", "path": "/dev/zero"}),
        ("finish", {"command": "submit"}),
    ]

    def respond(messages):
        step = sum(m["role"] == "assistant" for m in messages)
        name, parameters = steps[min(step, len(steps) - 1)]
        return Action(name, parameters, "Trying something.").to_text()

    return respond


def test_hostile_model_through_the_cli(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    tasks = make_toy_tasks(tmp_path / "toy", n=2)
    token = os.urandom(6).hex()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0])
            except TimeoutError:
                continue

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    pool = tmp_path / "pool.jsonl"
    try:
        with serve_scripted(hostile(token, listener.getsockname()[1])) as server:
            main(
                [
                    "--tasks",
                    str(Path(tasks[0].repo_path).parents[1]),
                    "--pool",
                    str(pool),
                    "--base_url",
                    server.base_url,
                    "--model",
                    "hostile",
                    "--max_steps",
                    "12",
                    "--tool_timeout",
                    "5",
                    "--sandbox",
                    "local",
                    "--sandbox_root",
                    str(tmp_path / "boxes"),
                ]  # fmt: skip
            )
    finally:
        stop.set()
        watcher.join()
        listener.close()
    text = pool.read_text()
    assert not any(value in text for value in SECRETS.values())
    trajectories = list(read_trajectories(pool))
    assert len(trajectories) == len(tasks)
    for trajectory in trajectories:
        observations = [m["content"] for m in trajectory.messages if m["role"] == "user"][1:]
        assert "PATH=" in observations[0] and "HOME=/tmp" in observations[0]  # `env` ran, and showed no key
        assert "created successfully" in observations[2] and observations[3].startswith("ERROR:")
        assert "Exit code: 0" not in observations[4] and "connected" not in observations[5].split("[STDERR]")[0]
        assert "not a regular file" in observations[7] and "not a regular file" in observations[8]
        assert trajectory.metadata["workdir"] == "/testbed" and trajectory.reward == 0.0
    for leaked in (
        f"/tmp/escape-{token}",
        f"/escape-{token}",
        f"/tmp/escape-editor-{token}",
        f"/escape-editor-{token}",
    ):
        assert not os.path.exists(leaked)
    assert connections == []
    assert not [p for p in (tmp_path / "boxes").iterdir() if p.name.startswith("entropo-sandbox-p")]
