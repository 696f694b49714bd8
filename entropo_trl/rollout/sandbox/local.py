"""The "local" backend: [`BwrapSandbox`], the isolated sandbox (a private checkout, and every command run in a fresh
bubblewrap namespace), and [`require_bwrap`], which checks that bubblewrap can make namespaces on this machine."""

from __future__ import annotations

import functools
import os
import resource
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .base import COMMAND_ENV, DEFAULT_MAX_OUTPUT, CommandResult, SandboxError, ShellSandbox
from .host import LocalSandbox
from .process import _kill_group, run_process

SANDBOX_WORKDIR = "/testbed"
"""Where the isolated local sandbox mounts the task's checkout: the path SWE-bench and R2E-Gym images use."""

BWRAP_MISSING = (
    "the local sandbox needs bubblewrap (`bwrap`), which is not installed. Install it with `apt-get install "
    "bubblewrap` (Debian/Ubuntu; `dnf install bubblewrap` on Fedora), or choose `--sandbox docker`; `--sandbox host` "
    "runs commands on this machine without isolation (trusted tasks only)"
)

# Top-level folders of the host the sandbox sees, read-only: the system's programs and libraries. Everything else
# (home folders, /root, /run and its sockets, /tmp, /var, /mnt, project folders) is absent.
_HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "nix")
# Files and folders under those that hold the host's secrets, hidden.
_MASKED_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-")
_MASKED_DIRS = ("/etc/ssh",)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of each command in the isolated local sandbox (`ulimit`, per process; bytes). The process
    limit counts the processes of one call; the kernel does not enforce it for root (uid 0), so run the runner as a
    normal user (or use Docker's `--pids-limit`) to bound a fork bomb to it."""

    file_size: int = 1024**3  # the largest file a command may write
    memory: int = 8 * 1024**3  # address space of each process
    processes: int = 1024


@functools.cache
def require_bwrap() -> str:
    """The path of a working `bwrap`; `SandboxError` naming the install command when it is missing, or the cause when
    it cannot make namespaces here (checked once per process)."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxError(BWRAP_MISSING)
    try:
        result, _ = run_process(
            [path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"], timeout=30
        )
    except OSError as error:
        raise SandboxError(f"bubblewrap ({path}) cannot run: {error}") from error
    if not result.ok:
        raise SandboxError(
            f"bubblewrap ({path}) cannot make a sandbox on this machine: {result.stderr.strip()}. It needs user "
            "namespaces (e.g. `sysctl kernel.unprivileged_userns_clone=1`, or an AppArmor profile allowing them "
            "for bwrap); otherwise choose `--sandbox docker`"
        )
    return path


def _python_dirs() -> list[str]:
    """The folders of the running Python (virtual environment and base installation) that the sandbox must see, so
    that `python` and `pytest` there are the ones running the library."""
    dirs = {
        os.path.realpath(folder)
        for folder in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    }
    visible = [f"/{name}" for name in _HOST_DIRS]
    dirs = {d for d in dirs if not any(d == v or d.startswith(v + "/") for v in visible)}
    return sorted(d for d in dirs if not any(d.startswith(other + "/") for other in dirs))


def _bwrap_args(checkout: str, private_tmp: str, env: dict[str, str]) -> list[str]:
    """bwrap's options for one sandbox: the mounts, the namespaces and the environment."""
    args: list[str] = []
    for name in _HOST_DIRS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += [arg for path in _MASKED_FILES if os.path.exists(path) for arg in ("--ro-bind", "/dev/null", path)]
    args += [arg for path in _MASKED_DIRS if os.path.isdir(path) for arg in ("--tmpfs", path)]
    args += ["--dev", "/dev", "--proc", "/proc", "--bind", private_tmp, "/tmp"]
    # after the private /tmp: a Python (a venv) that lives under the host's /tmp must stay visible over it
    for path in _python_dirs():
        args += ["--ro-bind", path, path]
    args += ["--bind", checkout, SANDBOX_WORKDIR]
    args += ["--remount-ro", "/", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    if os.geteuid() == 0:  # an unprivileged bwrap keeps no capabilities anyway
        args += ["--cap-drop", "ALL"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return [*args, "--chdir", SANDBOX_WORKDIR]


def _limits_script(limits: SandboxLimits) -> str:
    """Sets the limits (never above the runner's own hard limits), then runs the command ($1) in a fresh bash."""
    values = []
    for flag, resource_name, value, unit in (
        ("-f", "RLIMIT_FSIZE", limits.file_size, 1024),
        ("-v", "RLIMIT_AS", limits.memory, 1024),
        ("-u", "RLIMIT_NPROC", limits.processes, 1),
    ):
        hard = resource.getrlimit(getattr(resource, resource_name))[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        values.append(f"{flag} {max(1, value // unit)}")
    return f'ulimit -c 0 {" ".join(values)} && exec bash -c "$1"'


class BwrapSandbox(ShellSandbox):
    """The isolated local sandbox: a private copy of `repo` (as [`LocalSandbox`] makes it) mounted read-write at
    `/testbed`, and every command and file operation run in a fresh bubblewrap namespace.

    Inside: the host's system folders read-only (`/usr`, `/etc` without its secrets, ...) and the running Python's
    folders, nothing else of the host; a private `/tmp` (kept for the episode, deleted at [`close`]); no network; an
    environment of `PATH`, `HOME=/tmp`, `LANG`, [`COMMAND_ENV`] and `env` only; new PID, IPC, UTS and session
    namespaces, so every process of a call ends with it (background and `setsid` ones included); the limits of
    `limits` (file size, memory, processes); no capabilities. `checkout` is the copy's path on the host.
    """

    def __init__(
        self,
        repo: str | Path,
        base_commit: str | None = None,
        root: str | Path | None = None,
        env: dict[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ):
        self._owner_pid = os.getpid()
        self._closed = True
        self._lock = threading.Lock()
        self._running: set[int] = set()  # process groups of the calls in flight
        bwrap = require_bwrap()
        self._copy = LocalSandbox(repo, base_commit, root=root)  # made on the host, before the model runs anything
        try:
            self.workdir = SANDBOX_WORKDIR
            self.base_commit = self._copy.base_commit
            self.checkout = self._copy.workdir
            self.limits = limits or SandboxLimits()
            private_tmp = os.path.join(self._copy.scratch_dir, "tmp")
            os.mkdir(private_tmp)
            here = os.path.dirname(sys.executable)
            environment = {
                "PATH": f"{here}:{SYSTEM_PATH}",
                "HOME": "/tmp",
                "LANG": os.environ.get("LANG") or "C.UTF-8",
            }
            environment.update(COMMAND_ENV)
            environment.update(env or {})
            self._argv = [bwrap, *_bwrap_args(self.checkout, private_tmp, environment)]
            self._argv += ["bash", "-c", _limits_script(self.limits), "bash"]
        except BaseException:
            self._copy.close()  # the copy is made: do not leave it behind
            raise
        self._closed = False

    def _exec(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT, input: bytes | None = None
    ) -> CommandResult:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        result, pgid = run_process(
            [*self._argv, command],
            timeout=timeout,
            max_output=max_output,
            env={"PATH": SYSTEM_PATH},
            input=input,
            on_start=self._started,
        )
        _kill_group(pgid)  # the namespace died with its first process; this is bwrap's own process group
        with self._lock:
            self._running.discard(pgid)
        return result

    def _started(self, pgid: int) -> None:
        with self._lock:
            self._running.add(pgid)
            closed = self._closed
        if closed:  # closed while this call was starting (e.g. SIGTERM): it must not run on
            _kill_group(pgid)

    def close(self) -> None:
        """Kill the calls still running (bwrap's `--die-with-parent` then ends their namespaces) and remove the
        checkout, so a runner that stops (SIGTERM, Ctrl-C) does not wait for their time limits."""
        with self._lock:
            if getattr(self, "_closed", True):
                return
            self._closed = True
            running = list(self._running)
        for pgid in running:
            _kill_group(pgid)
        self._copy.close()
