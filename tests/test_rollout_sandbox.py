"""Sandboxes: LocalSandbox and the isolated BwrapSandbox against real temporary repositories, DockerSandbox's command
lines (and, when a daemon answers, a real container), make_sandbox and the sweep of stale sandbox folders."""

import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from entropo_trl.rollout.sandbox import (
    COMMAND_ENV,
    SWEBENCH_SETUP,
    BwrapSandbox,
    CommandResult,
    DockerSandbox,
    LocalSandbox,
    SandboxError,
    SandboxLimits,
    default_docker_setup,
    make_sandbox,
    require_bwrap,
    sweep_stale_sandboxes,
)
from entropo_trl.rollout.sandbox.docker import owner_label
from entropo_trl.rollout.sandbox.host import _warn_unisolated
from entropo_trl.rollout.sandbox.local import _python_dirs
from entropo_trl.rollout.tasks import Task

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def make_repo(path: Path, git: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "pkg").mkdir()
    (path / "pkg" / "__init__.py").write_text("")
    (path / "pkg" / "core.py").write_text("def add(a, b):\n    return a + b\n")
    (path / "README.md").write_text("demo\n")
    if git:
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
        for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "one"]):
            subprocess.run(command, cwd=path, env=env, check=True)
        (path / "README.md").write_text("demo v2\n")
        subprocess.run(["git", "commit", "-q", "-am", "two"], cwd=path, env=env, check=True)
    return path


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat)
    return alive


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "project")


@pytest.fixture
def sandbox(repo, tmp_path):
    with LocalSandbox(repo, root=tmp_path) as box:
        yield box


# ----------------------------------------------------------------------------------------------------- LocalSandbox


def test_copy_is_private_and_a_git_repo(repo, sandbox):
    assert Path(sandbox.workdir) != repo and Path(sandbox.workdir).is_dir()
    assert os.path.isabs(sandbox.workdir) and os.path.realpath(sandbox.workdir) == sandbox.workdir
    assert len(sandbox.base_commit) == 40
    assert sandbox.run("git rev-parse HEAD").stdout.strip() == sandbox.base_commit
    sandbox.write_file("pkg/core.py", "changed\n")
    sandbox.run("rm README.md")
    assert (repo / "pkg" / "core.py").read_text().startswith("def add")
    assert (repo / "README.md").exists()
    assert not (repo / ".git").exists()  # the source folder is left as it was


def test_close_removes_the_copy(repo, tmp_path):
    box = LocalSandbox(repo, root=tmp_path)
    workdir = box.workdir
    box.close()
    box.close()
    assert not os.path.exists(workdir)
    with pytest.raises(SandboxError, match="closed"):
        box.run("true")


def test_missing_repo_is_a_clear_error(tmp_path):
    with pytest.raises(SandboxError, match="not found"):
        LocalSandbox(tmp_path / "nope")


def test_base_commit_of_a_git_repo(tmp_path):
    source = make_repo(tmp_path / "gitrepo", git=True)
    first = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=source, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True).stdout.strip()
    with LocalSandbox(source, root=tmp_path) as box:
        assert box.base_commit == head
        assert box.read_file("README.md") == "demo v2\n"
    with LocalSandbox(source, base_commit=first, root=tmp_path) as box:
        assert box.base_commit == first
        assert box.read_file(os.path.join(box.workdir, "README.md")) == "demo\n"
        assert box.diff() == ""
    with pytest.raises(SandboxError, match="could not set up git"):
        LocalSandbox(source, base_commit="no-such-commit", root=tmp_path)


def test_diff_has_modified_and_new_files(sandbox):
    assert sandbox.diff() == ""
    sandbox.write_file("pkg/core.py", "def add(a, b):\n    return b + a\n")
    sandbox.write_file("pkg/new/extra.py", "X = 1\n")
    sandbox.run("git add pkg/core.py")  # what the agent staged is left alone
    patch = sandbox.diff()
    assert "diff --git a/pkg/core.py b/pkg/core.py" in patch and "+    return b + a" in patch
    assert "new file mode" in patch and "+X = 1" in patch
    assert sandbox.run("git status --short").stdout.splitlines() == ["M  pkg/core.py", "?? pkg/new/"]


def test_apply_patch_round_trip(repo, tmp_path):
    with LocalSandbox(repo, root=tmp_path) as first:
        first.write_file("pkg/core.py", "def add(a, b):\n    return a + b + 0\n")
        first.write_file("docs/notes.txt", "hello\n")
        first.run("rm README.md")
        patch = first.diff()
    with LocalSandbox(repo, root=tmp_path) as second:
        result = second.apply_patch(patch)
        assert result.ok, result.stderr
        assert second.read_file("pkg/core.py").endswith("a + b + 0\n")
        assert second.read_file("docs/notes.txt") == "hello\n"
        assert not second.exists("README.md")
        assert second.diff() == patch
        bad = second.apply_patch("not a patch\n")
        assert not bad.ok and bad.stderr


def test_run_exit_code_stdout_stderr_and_cwd(sandbox):
    result = sandbox.run("echo out; echo err >&2; pwd; exit 3")
    assert isinstance(result, CommandResult)
    assert result.exit_code == 3 and not result.ok and not result.timed_out
    assert result.stdout == f"out\n{sandbox.workdir}\n"
    assert result.stderr == "err\n"
    assert result.duration > 0
    env = sandbox.run("echo $PAGER $GIT_PAGER $TERM $PYTHONDONTWRITEBYTECODE").stdout.split()
    assert env == ["cat", "cat", "dumb", "1"]
    assert sandbox.run("cat").stdout == ""  # stdin is empty, nothing waits for input


def test_timeout_kills_the_whole_process_group(sandbox):
    start = time.monotonic()
    result = sandbox.run("echo started; sleep 1000 & while true; do sleep 0.1; done", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.exit_code == -1
    assert result.stdout == "started\n"
    assert 1.0 <= elapsed < 3.0
    marker = sandbox.run("sleep 1000 & echo $$", timeout=5)  # the group id is the bash pid
    pgid = int(marker.stdout.strip())
    deadline = time.monotonic() + 2
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == []


def test_timeout_group_is_dead_after_the_limit(sandbox):
    sandbox.run("true")
    result = sandbox.run("echo $$ > pgid; sleep 1000 & while true; do sleep 0.1; done", timeout=0.5)
    assert result.timed_out
    pgid = int(sandbox.read_file("pgid"))
    deadline = time.monotonic() + 2
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == []


def test_background_child_holding_the_pipes_does_not_hang(sandbox):
    start = time.monotonic()
    result = sandbox.run("sleep 1000 & echo done", timeout=30)
    assert time.monotonic() - start < 2
    assert result.ok and result.stdout == "done\n"


def test_redirected_background_process_survives_until_close(repo, tmp_path):
    box = LocalSandbox(repo, root=tmp_path)
    pid = int(box.run("sleep 1000 > /dev/null 2>&1 & echo $!").stdout)
    assert box.run(f"kill -0 {pid}").ok
    box.close()
    deadline = time.monotonic() + 2
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)


def test_output_is_capped(sandbox):
    result = sandbox.run("yes abc | head -c 100000; yes err | head -c 5000 >&2", max_output=1000)
    assert result.stdout.startswith("abc\nabc\n")
    assert len(result.stdout) < 1200 and "output truncated" in result.stdout and "99000" in result.stdout
    assert "output truncated" in result.stderr
    flood = sandbox.run("yes", timeout=1, max_output=100)
    assert flood.timed_out and len(flood.stdout) < 300


def test_later_sandboxes_copy_a_lean_prepared_checkout(repo, tmp_path):
    root = tmp_path / "boxes"
    root.mkdir()
    with LocalSandbox(repo, root=root) as first:
        first.write_file("pkg/core.py", "edited in the first sandbox\n")
        with LocalSandbox(repo, root=root) as second:
            assert second.base_commit == first.base_commit
            assert second.read_file("pkg/core.py").startswith("def add")  # not the first sandbox's edit
            git_dir = Path(second.workdir) / ".git"
            assert not list((git_dir / "hooks").glob("*.sample"))  # the template dropped git's sample hooks
            loose = [p for p in (git_dir / "objects").glob("??/*")]
            assert not loose and list((git_dir / "objects" / "pack").glob("*.pack"))  # and packed its objects
            assert second.run("git status --porcelain").stdout == ""
            assert second.run("git log --format=%H").stdout.split() == [second.base_commit]
            second.write_file("pkg/core.py", "def add(a, b):\n    return a - b\n")
            assert "-    return a + b\n+    return a - b" in second.diff()
    templates = [p for p in root.iterdir() if p.name.startswith("entropo-sandbox-templates-")]
    assert len(templates) == 1  # kept beside the sandboxes, under the same root
    (repo / "NEW.md").write_text("new\n")  # a changed source gets a fresh template
    with LocalSandbox(repo, root=root) as third:
        assert third.read_file("NEW.md") == "new\n" and "NEW.md" not in third.diff()


def test_relative_root(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second copies the prepared checkout
        with LocalSandbox(repo, root="boxes") as box:
            assert Path(box.workdir).is_relative_to(tmp_path / "boxes")
            box.write_file("pkg/core.py", "def add(a, b):\n    return a - b\n")
            patch = box.diff()
            assert "+    return a - b" in patch
        with LocalSandbox(repo, root="boxes") as other:
            assert other.apply_patch(patch).ok and "a - b" in other.read_file("pkg/core.py")
    templates = list((tmp_path / "boxes").glob("entropo-sandbox-templates-*/*"))
    assert len(templates) == 1


def test_concurrent_first_sandboxes_make_one_template(repo, tmp_path):
    root = tmp_path / "boxes"
    root.mkdir()
    barrier = threading.Barrier(6)

    def make(_):
        barrier.wait()
        box = LocalSandbox(repo, root=root)
        box.close()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(make, range(6)))
    assert len(list(root.glob("entropo-sandbox-templates-*/*"))) == 1
    assert not [p for p in root.iterdir() if p.name.startswith("entropo-sandbox-") and "templates" not in p.name]


def test_least_recently_used_templates_are_deleted(tmp_path, monkeypatch):
    from collections import OrderedDict

    from entropo_trl.rollout.sandbox import checkout as module

    monkeypatch.setattr(module, "MAX_TEMPLATES", 2)
    monkeypatch.setattr(module, "_TEMPLATES", OrderedDict())  # only this test's templates
    root = tmp_path / "boxes"
    root.mkdir()
    sources = [make_repo(tmp_path / f"source{i}") for i in range(3)]
    LocalSandbox(sources[0], root=root).close()
    [first_key] = module._TEMPLATES
    held = module._acquire_template(first_key)  # a copy of the first template is in progress
    LocalSandbox(sources[1], root=root).close()
    LocalSandbox(sources[2], root=root).close()  # a third template: the least recently used is evicted
    assert first_key not in module._TEMPLATES and held.retired and len(module._TEMPLATES) == 2
    assert os.path.isdir(held.path)  # kept while the copy runs
    module._release_template(held)
    assert not os.path.exists(held.path)
    assert len(list(root.glob("entropo-sandbox-templates-*/*"))) == 2
    with LocalSandbox(sources[0], root=root) as again:  # made again when needed
        assert again.read_file("pkg/core.py").startswith("def add")
    assert len(module._TEMPLATES) == 2 and len(list(root.glob("entropo-sandbox-templates-*/*"))) == 2


def test_file_operations(sandbox):
    sandbox.write_file("a/b/c.txt", "héllo\n")
    assert sandbox.read_file(os.path.join(sandbox.workdir, "a/b/c.txt")) == "héllo\n"
    assert sandbox.exists("a/b") and sandbox.is_dir("a/b") and not sandbox.is_dir("a/b/c.txt")
    assert not sandbox.exists("missing.txt")
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("missing.txt")
    sandbox.write_file(".hidden/x.txt", "")
    sandbox.write_file("a/b/c/d/deep.txt", "")
    assert sandbox.list_dir(".") == ["README.md", "a/", "a/b/", "pkg/", "pkg/__init__.py", "pkg/core.py"]
    assert sandbox.list_dir("a", depth=3) == ["b/", "b/c.txt", "b/c/", "b/c/d/"]
    with pytest.raises(NotADirectoryError):
        sandbox.list_dir("README.md")


def test_non_git_folder_with_linked_git_file(tmp_path):
    source = make_repo(tmp_path / "worktree")
    (source / ".git").write_text("gitdir: /elsewhere/.git/worktrees/x\n")
    with LocalSandbox(source, root=tmp_path) as box:
        assert box.run("git log --oneline").stdout.count("\n") == 1
        assert box.diff() == ""
    assert (source / ".git").read_text().startswith("gitdir:")


# ---------------------------------------------------------------------------------------------------- DockerSandbox


def test_docker_command_lines():
    box = DockerSandbox("img:1", workdir="/testbed", docker="podman", run_args=["--network", "none"], name="ep1")
    assert box.start_command() == [
        "podman", "run", "-d", "--rm", "--name", "ep1", "--label", "entropo.sandbox=1", "--network", "none",
        "--label", f"entropo.owner={owner_label(os.getpid())}",  # HOST:PID:START, what the sweep of dead runs reads
        "-w", "/testbed", "img:1", "sleep", "86400",
    ]  # fmt: skip
    assert DockerSandbox("img", lifetime=90.5).start_command()[-2:] == ["sleep", "91"]  # a leaked container ends
    argv = box.exec_command("ls -la", timeout=12.5)
    assert argv[:2] == ["podman", "exec"] and "-i" not in argv
    assert argv[argv.index("-w") + 1] == "/testbed"
    assert "PAGER=cat" in argv and "TERM=dumb" in argv
    assert argv[argv.index("ep1") + 1 :] == ["timeout", "-s", "KILL", "13", "bash", "-c", "ls -la"]
    assert box.exec_command("cat", stdin=True)[-4:] == ["ep1", "bash", "-c", "cat"]
    assert "-i" in box.exec_command("cat", stdin=True)
    assert box.stop_command() == ["podman", "rm", "-f", "ep1"]
    assert DockerSandbox("img").name.startswith("entropo-")
    # SWE-bench images activate their environment only in ~/.bashrc: the setup line runs before each command
    swebench = "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    assert default_docker_setup(swebench) == SWEBENCH_SETUP and default_docker_setup("img:1") is None
    set_up = DockerSandbox(swebench, setup=SWEBENCH_SETUP, name="ep2").exec_command("python -V", timeout=5)
    assert set_up[-3:] == ["bash", "-c", SWEBENCH_SETUP + "\npython -V"]
    assert box.resolve("src/x.py") == "/testbed/src/x.py" and box.resolve("/etc/hosts") == "/etc/hosts"


def test_docker_needs_start_and_reports_errors():
    box = DockerSandbox("img", docker="definitely-not-a-docker-binary")
    with pytest.raises(SandboxError, match="not running"):
        box.run("true")
    with pytest.raises(SandboxError, match="Docker CLI not found"):
        box.start()
    box.close()  # nothing to stop


def test_docker_unreachable_daemon_is_a_clear_error(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text(
        "#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    with pytest.raises(SandboxError, match="Docker daemon not reachable"):
        DockerSandbox("img", docker=str(fake)).start()


def _docker_daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _docker_daemon_answers(), reason="no Docker daemon answers `docker info`")
def test_docker_sandbox_end_to_end():
    image = os.environ.get("ENTROPO_TEST_DOCKER_IMAGE", "python:3.11-slim")
    with DockerSandbox(image, workdir="/work") as box:
        if box.run("command -v git").exit_code != 0:
            pytest.skip(f"{image} has no git")
        assert len(box.base_commit) == 40 and box.diff() == ""
        box.write_file("pkg/mod.py", "x = 1\n")
        assert box.read_file("pkg/mod.py") == "x = 1\n" and box.exists("pkg") and box.is_dir("pkg")
        assert box.list_dir(".") == ["pkg/", "pkg/mod.py"]
        assert "+x = 1" in box.diff()
        result = box.run("echo hi; sleep 1000 & while true; do sleep 0.1; done", timeout=2)
        assert result.timed_out and result.stdout == "hi\n"


FAKE_DOCKER = """#!/bin/bash
# A stand-in for the docker CLI: `run` and `rm` succeed, `exec` runs the command on this machine.
case "$1" in
  run|rm) echo fake; exit 0 ;;
  exec) shift ;;
  *) exit 1 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in
    -i) shift ;;
    -w) cd "$2" || exit 126; shift 2 ;;
    -e) export "$2"; shift 2 ;;
    *) shift; break ;;  # the container name
  esac
done
exec "$@"
"""


def test_docker_sandbox_through_a_fake_cli(tmp_path):
    """The shell snippets behind DockerSandbox's file operations, run by a fake `docker exec` on this machine."""
    fake = tmp_path / "docker"
    fake.write_text(FAKE_DOCKER)
    fake.chmod(0o755)
    workdir = make_repo(tmp_path / "testbed")
    with DockerSandbox("img", workdir=str(workdir), docker=str(fake)) as box:
        assert len(box.base_commit) == 40 and box.diff() == ""
        assert box.run("echo $PAGER; pwd").stdout == f"cat\n{workdir}\n"
        box.write_file("pkg/new/mod.py", "héllo = 1\n")
        assert box.read_file(str(workdir / "pkg/new/mod.py")) == "héllo = 1\n"
        assert box.exists("pkg/new") and box.is_dir("pkg/new") and not box.is_dir("pkg/new/mod.py")
        assert not box.exists("missing")
        with pytest.raises(FileNotFoundError):
            box.read_file("missing")
        with pytest.raises(IsADirectoryError):
            box.read_file("pkg")
        (workdir / "blob.bin").write_bytes(b"\xff\xfe")
        with pytest.raises(UnicodeDecodeError):
            box.read_file("blob.bin")
        (workdir / "blob.bin").unlink()
        with pytest.raises(NotADirectoryError):
            box.list_dir("README.md")
        box.write_file(".hidden/x", "")
        assert box.list_dir(".") == ["README.md", "pkg/", "pkg/__init__.py", "pkg/core.py", "pkg/new/"]
        patch = box.diff()
        assert "+héllo = 1" in patch
        timed = box.run("echo hi; sleep 1000 & while true; do sleep 0.1; done", timeout=1)
        assert timed.timed_out and timed.exit_code == -1 and timed.stdout == "hi\n"
    with LocalSandbox(make_repo(tmp_path / "fresh"), root=tmp_path) as fresh:
        assert fresh.apply_patch(patch).ok and fresh.read_file("pkg/new/mod.py") == "héllo = 1\n"


# ------------------------------------------------------------------------------------------ BwrapSandbox (isolated)


@pytest.fixture
def isolated(repo, tmp_path):
    with BwrapSandbox(repo, root=tmp_path / "boxes", env={"TASK_VAR": "task value"}) as box:
        yield box


@needs_bwrap
def test_isolated_checkout_is_at_testbed_and_round_trips(repo, isolated, tmp_path):
    assert isolated.workdir == "/testbed" and len(isolated.base_commit) == 40
    assert isolated.run("pwd; git rev-parse HEAD").stdout.split() == ["/testbed", isolated.base_commit]
    isolated.write_file("pkg/core.py", "def add(a, b):\n    return b + a\n")
    isolated.write_file("/testbed/docs/new.txt", "héllo\n")
    assert Path(isolated.checkout, "docs/new.txt").read_text() == "héllo\n"  # the private copy on the host
    assert isolated.read_file("docs/new.txt") == "héllo\n" and isolated.exists("docs") and isolated.is_dir("docs")
    assert isolated.list_dir(".") == ["README.md", "docs/", "docs/new.txt", "pkg/", "pkg/__init__.py", "pkg/core.py"]
    patch = isolated.diff()
    assert "+    return b + a" in patch and "+héllo" in patch
    assert (repo / "pkg/core.py").read_text().startswith("def add(a, b):\n    return a + b")  # the source is untouched
    with BwrapSandbox(repo, root=tmp_path / "boxes") as other:
        assert other.apply_patch(patch).ok and other.diff() == patch
    with pytest.raises(FileNotFoundError):
        isolated.read_file("missing.txt")
    with pytest.raises(IsADirectoryError):
        isolated.read_file("pkg")
    with pytest.raises(NotADirectoryError):
        isolated.list_dir("README.md")
    assert len(isolated.list_dir(".", limit=2)) == 2


@needs_bwrap
def test_isolated_writes_outside_the_checkout_do_not_reach_the_host(isolated, tmp_path):
    token = os.urandom(6).hex()
    result = isolated.run(
        f"echo x > /tmp/escape-{token}; echo y > /testbed/../escape-{token}; touch /usr/escape-{token}; "
        f"echo z > {tmp_path}/escape-{token}; cat /tmp/escape-{token}"
    )
    assert result.stdout == "x\n"  # the private /tmp works, and is kept for the episode
    assert "Read-only file system" in result.stderr or "No such file" in result.stderr
    for host_path in (
        f"/tmp/escape-{token}",
        f"/escape-{token}",
        f"/usr/escape-{token}",
        f"{tmp_path}/escape-{token}",
    ):
        assert not os.path.exists(host_path)
    with pytest.raises(OSError, match="cannot write .*Read-only file system"):
        isolated.write_file(f"/testbed/../escape-{token}", "x")
    isolated.write_file(f"/tmp/escape-{token}", "private")
    assert not os.path.exists(f"/tmp/escape-{token}") and isolated.read_file(f"/tmp/escape-{token}") == "private"
    assert isolated.run("ls /home").exit_code != 0 and isolated.run("ls /run").exit_code != 0  # absent
    home = os.path.expanduser("~")
    python_dirs = [Path(d) for d in _python_dirs() if Path(d).is_relative_to(home)]
    allowed = {d.relative_to(home).parts[0] for d in python_dirs}
    assert set(isolated.run(f"ls -A {home}").stdout.split()) <= allowed  # at most the running Python's folders
    assert isolated.run("cat /etc/shadow").stdout == ""


@needs_bwrap
def test_isolated_environment_has_no_secrets(monkeypatch, repo, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret_value")
    with BwrapSandbox(repo, root=tmp_path, env={"TASK_VAR": "task value"}) as box:
        shown = box.run("env; tr '\\0' '\\n' < /proc/self/environ; cat /proc/1/environ /proc/$PPID/environ").stdout
    assert "secret_value" not in shown and "secret-value" not in shown
    names = {line.split("=", 1)[0] for line in shown.splitlines() if "=" in line}
    assert (
        {"PATH", "HOME", "LANG", "TASK_VAR"}
        <= names
        <= {"PATH", "HOME", "LANG", "TASK_VAR", "PWD", "SHLVL", "_"} | set(COMMAND_ENV)
    )


@needs_bwrap
def test_isolated_sandbox_has_no_network(isolated):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        script = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = isolated.run(f'python -c "{script}"', timeout=30)
        assert result.exit_code != 0 and "Connection refused" in result.stderr
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@needs_bwrap
def test_isolated_processes_end_with_their_call(isolated):
    token = os.urandom(6).hex()
    result = isolated.run(
        f"setsid bash -c 'exec -a entropo-{token} sleep 1000' & (bash -c 'exec -a entropo-{token} sleep 1000' &); echo ok"
    )
    assert result.ok and result.stdout == "ok\n"
    time.sleep(0.3)
    found = subprocess.run(["pgrep", "-f", f"entropo-{token}"], capture_output=True, text=True).stdout
    assert found == ""  # the double-forked process died with the call's PID namespace
    assert isolated.run("ps -e -o pid= | wc -l").stdout.strip() in {"2", "3", "4"}  # a fresh PID namespace


@needs_bwrap
def test_isolated_limits(repo, tmp_path):
    limits = SandboxLimits(file_size=1024 * 1024)
    with BwrapSandbox(repo, root=tmp_path, limits=limits) as box:
        result = box.run("head -c 2000000 /dev/zero > big; stat -c %s big")
        assert result.stdout.strip() == str(1024 * 1024)  # cut at the limit (SIGXFSZ)
        assert box.run("ulimit -f; ulimit -u; ulimit -v").stdout.split() == ["1024", "1024", str(8 * 1024 * 1024)]


@needs_bwrap
def test_isolated_special_files_are_refused_within_the_time_limit(isolated):
    isolated.run("mkfifo fifo && ln -s /dev/zero zero")
    for path in ("fifo", "/dev/zero", "zero"):
        start = time.monotonic()
        with pytest.raises(OSError, match="not a regular file"):
            isolated.read_file(path, timeout=2)
        with pytest.raises(OSError, match="not a regular file"):
            isolated.write_file(path, "x", timeout=2)
        assert time.monotonic() - start < 2
    isolated.run("head -c 3000 /dev/zero > big")
    with pytest.raises(OSError, match="3000 bytes"):
        isolated.read_file("big", limit=1000)


@needs_bwrap
def test_isolated_timeout_kills_everything(isolated):
    start = time.monotonic()
    result = isolated.run("echo started; setsid sleep 1000 & while true; do sleep 0.1; done", timeout=1.0)
    assert result.timed_out and result.exit_code == -1 and result.stdout == "started\n"
    assert time.monotonic() - start < 3


def test_host_sandbox_refuses_special_files(sandbox):
    os.mkfifo(Path(sandbox.workdir, "fifo"))
    for path in ("fifo", "/dev/zero"):
        with pytest.raises(OSError, match="not a regular file"):
            sandbox.read_file(path)
    with pytest.raises(OSError, match="not a regular file"):
        sandbox.write_file("fifo", "x")
    sandbox.write_file("big", "x" * 3000)
    with pytest.raises(OSError, match="3000 bytes"):
        sandbox.read_file("big", limit=1000)
    assert len(sandbox.list_dir(".", limit=2)) == 2


def test_missing_bwrap_is_a_clear_error(monkeypatch, repo, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    require_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
            make_sandbox("local", Task("t", "issue", repo_path=str(repo)), str(tmp_path))
    finally:
        require_bwrap.cache_clear()


def test_make_sandbox_backends(repo, tmp_path, caplog):
    task = Task("t", "issue", repo_path=str(repo))
    _warn_unisolated.cache_clear()  # warned once per process: another test may have used a host sandbox already
    with make_sandbox("host", task, str(tmp_path)) as host:
        assert isinstance(host, LocalSandbox) and host.workdir != "/testbed"
    assert "not isolated" in caplog.text or "without isolation" in caplog.text
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        make_sandbox("chroot", task)
    with pytest.raises(ValueError, match="no Docker image"):
        make_sandbox("docker", task)
    with pytest.raises(ValueError, match="no local repository"):
        make_sandbox("local", Task("t", "issue"))
    assert DockerSandbox("img").start_command()[8:10] == ["--network", "none"]  # no network by default
    if shutil.which("bwrap"):
        with make_sandbox("local", task, str(tmp_path)) as local:
            assert isinstance(local, BwrapSandbox) and local.workdir == "/testbed"


def test_sweep_removes_only_the_folders_of_dead_runs(repo, tmp_path):
    root = tmp_path / "boxes"
    live = LocalSandbox(repo, root=root)
    stale = root / "entropo-sandbox-p999999999s1-abc"
    (stale / "repo").mkdir(parents=True)
    (stale / "repo" / "locked").mkdir()
    (stale / "repo" / "locked").chmod(0o500)
    unmarked = root / "entropo-sandbox-old"
    unmarked.mkdir()
    unknown_start = root / "entropo-sandbox-p999999999s0-abc"  # made where the start time could not be read
    unknown_start.mkdir()
    other = root / "unrelated"
    other.mkdir()
    try:
        assert sweep_stale_sandboxes(root) == [str(stale)]
        assert not stale.exists() and unmarked.exists() and other.exists() and unknown_start.exists()
        assert os.path.isdir(live.workdir)  # this process's sandbox stays
        assert sweep_stale_sandboxes(tmp_path / "missing") == []
    finally:
        live.close()


def test_a_python_under_tmp_stays_visible_over_the_private_tmp(monkeypatch):
    """A venv in the host's /tmp (a clone there, as CI may make) is bound after the private /tmp, not hidden by it."""
    from entropo_trl.rollout.sandbox import local as module

    monkeypatch.setattr(module, "_python_dirs", lambda: ["/tmp/clone/.venv"])
    args = module._bwrap_args("/tmp/boxes/repo", "/tmp/boxes/tmp", {})
    private_tmp = args.index("/tmp/boxes/tmp")
    venv = args.index("/tmp/clone/.venv")
    assert args[private_tmp + 1] == "/tmp" and venv > private_tmp and args[venv - 1] == "--ro-bind"
