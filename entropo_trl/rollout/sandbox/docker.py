"""The "docker" backend: [`DockerSandbox`], one container per episode driven through the `docker` CLI, and the setup
line of SWE-bench images."""

from __future__ import annotations

import logging
import math
import os
import posixpath
import signal
import subprocess
import uuid
from collections.abc import Sequence

from .base import _ENSURE_BASE_SCRIPT, COMMAND_ENV, DEFAULT_MAX_OUTPUT, CommandResult, SandboxError, ShellSandbox
from .checkout import _process_start
from .process import _kill_group, run_process

SWEBENCH_SETUP = "source /opt/miniconda3/bin/activate && conda activate testbed"
"""What the SWE-bench images' `~/.bashrc` does: activate the conda environment the repository is installed in."""


def default_docker_setup(image: str | None) -> str | None:
    """The setup line for an image: [`SWEBENCH_SETUP`] for SWE-bench harness images (`swebench/sweb.eval.*`), else
    nothing."""
    return SWEBENCH_SETUP if image and "sweb.eval." in image else None


logger = logging.getLogger(__name__)


class DockerSandbox(ShellSandbox):
    """One container per episode, started from `image` with the repository at `workdir`.

    The container sleeps forever and every command is a `docker exec`; inside, `timeout -s KILL` kills the command's
    whole process group at the time limit. [`start`] (or entering the context) starts the container and records
    `HEAD` as the base commit (a workdir that is not a git repository is made one); [`close`] removes it.

    `run_args` go to `docker run` unchanged (default `["--network", "none"]`: no network; e.g. add `"--memory", "8g"`,
    `"--pids-limit", "4096"`). `setup` runs before
    every command in the same shell, e.g. [`SWEBENCH_SETUP`] for SWE-bench images, whose
    environment is activated only by `~/.bashrc`, which `bash -c` does not read ([`default_docker_setup`]).
    Containers carry the label `entropo.sandbox` and stop by themselves after `lifetime` seconds, so a runner killed
    without cleaning up leaves none running for long (`docker rm -f $(docker ps -q -f label=entropo.sandbox)` removes
    them at once).
    """

    # Extra seconds the host waits for `docker exec` beyond the command's own limit.
    HOST_GRACE = 15.0

    def __init__(
        self,
        image: str,
        workdir: str = "/testbed",
        docker: str = "docker",
        run_args: Sequence[str] = ("--network", "none"),
        name: str | None = None,
        setup: str | None = None,
        lifetime: float = 86_400.0,
    ):
        self.image = image
        self.setup = setup
        self.lifetime = lifetime
        self.workdir = posixpath.normpath(workdir)
        self.docker = docker
        self.run_args = list(run_args)
        self.name = name or f"entropo-{uuid.uuid4().hex[:12]}"
        self.base_commit = ""
        self._started = False
        self._owner_pid = os.getpid()

    # ---- command lines (pure)

    def start_command(self) -> list[str]:
        return [
            self.docker,
            "run",
            "-d",
            "--rm",
            "--name",
            self.name,
            "--label",
            "entropo.sandbox=1",
            *self.run_args,
            *("--label", f"{OWNER_LABEL}={owner_label(self._owner_pid)}"),  # for sweeps of dead runs
            "-w",
            self.workdir,
            self.image,
            "sleep",
            str(max(1, math.ceil(self.lifetime))),
        ]

    def exec_command(self, command: str, timeout: float | None = None, stdin: bool = False) -> list[str]:
        """`docker exec` of `bash -c command` in `workdir`, under `timeout -s KILL` when a time limit is given."""
        argv = [self.docker, "exec", *(["-i"] if stdin else []), "-w", self.workdir]
        for key, value in COMMAND_ENV.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(self.name)
        if timeout is not None:
            argv += ["timeout", "-s", "KILL", str(max(1, math.ceil(timeout)))]
        if self.setup:
            command = f"{self.setup}\n{command}"
        return [*argv, "bash", "-c", command]

    def stop_command(self) -> list[str]:
        return [self.docker, "rm", "-f", self.name]

    # ---- lifecycle

    def start(self) -> DockerSandbox:
        """Start the container and record the base commit. Raises `SandboxError` when Docker is unusable."""
        if self._started:
            return self
        try:
            started = subprocess.run(self.start_command(), capture_output=True, text=True, timeout=600)
        except FileNotFoundError as error:
            raise SandboxError(f"Docker CLI not found: {self.docker!r} ({error})") from error
        except subprocess.TimeoutExpired as error:
            raise SandboxError(f"`docker run` of {self.image} did not return within 600 s") from error
        if started.returncode != 0:
            message = started.stderr.strip()
            if "daemon" in message.lower() or "docker.sock" in message:
                raise SandboxError(f"Docker daemon not reachable: {message}")
            raise SandboxError(f"could not start a container from {self.image}: {message}")
        self._started = True
        result = self.run(_ENSURE_BASE_SCRIPT, timeout=300)
        if not result.ok:
            self.close()
            raise SandboxError(f"could not record the base commit in {self.workdir}: {result.stderr.strip()}")
        self.base_commit = result.stdout.split()[-1]
        return self

    def __enter__(self):
        return self.start()

    def close(self) -> None:
        if not getattr(self, "_started", False):
            return
        self._started = False
        try:
            subprocess.run(self.stop_command(), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass

    # ---- commands and files

    def _exec(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT, input: bytes | None = None
    ) -> CommandResult:
        if not self._started:
            raise SandboxError("the container is not running: call start() first")
        argv = self.exec_command(command, timeout, stdin=input is not None)
        result, pgid = run_process(argv, timeout=timeout + self.HOST_GRACE, max_output=max_output, input=input)
        _kill_group(pgid)  # only the local docker client, the container is untouched
        # `timeout -s KILL` kills its whole group, itself included: docker reports 137 (128 + SIGKILL).
        if result.timed_out or (result.exit_code in (137, -signal.SIGKILL) and result.duration >= timeout):
            result.exit_code, result.timed_out = -1, True
        elif result.exit_code in (125, 126) and "No such container" in result.stderr:
            raise SandboxError(f"container {self.name} is gone: {result.stderr.strip()}")
        return result


OWNER_LABEL = "entropo.owner"


def owner_label(pid: int) -> str:
    """`HOST:PID:START`: the process that owns a container, named so that a reused pid never passes for it."""
    return f"{os.uname().nodename}:{pid}:{_process_start(pid)}"


def sweep_stale_containers(docker: str = "docker") -> list[str]:
    """Remove the containers of this host's Docker daemon that sandboxes of processes which are gone left behind (the
    label `entropo.owner=HOST:PID:START` that [`DockerSandbox`] sets). Containers of other hosts, of live processes,
    and without the label are left alone. Returns the removed containers' ids; none when Docker is not usable."""
    host = os.uname().nodename
    listing = [
        docker,
        "ps",
        "-a",
        "--filter",
        f"label={OWNER_LABEL}",
        "--format",
        f'{{{{.ID}}}} {{{{.Label "{OWNER_LABEL}"}}}}',
    ]
    try:
        listed = subprocess.run(listing, capture_output=True, text=True, timeout=60)
        if listed.returncode != 0:
            raise OSError(listed.stderr.strip())
        stale = []
        for line in listed.stdout.splitlines():
            container, _, owner = line.partition(" ")
            owner_host, pid, start = (owner.split(":") + ["", "", ""])[:3]
            if owner_host == host and pid.isdigit() and start and _process_start(int(pid)) != start:
                stale.append(container)
        if stale:
            subprocess.run([docker, "rm", "-f", *stale], capture_output=True, timeout=300)
            logger.info(f"removed {len(stale)} sandbox containers left by earlier runs on {host}")
        return stale
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning(f"could not sweep the sandbox containers on {host}: {error}")
        return []
