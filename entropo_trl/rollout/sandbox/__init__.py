"""Sandboxes: where an agent's commands run and its files live, one per episode.

Four implementations share one interface, [`Sandbox`] (`base.py`); [`make_sandbox`] picks one by backend name:

- "local" (`local.py`): [`BwrapSandbox`] copies a folder into a private temporary directory and mounts it at
  `/testbed` inside a bubblewrap (`bwrap`) namespace for every command and file operation: no network, a cleared
  environment, a read-only view of the system's programs and nothing else of the host, a private `/tmp`, its own PID
  namespace (no process outlives its call) and limits on file size, processes and memory. The model's commands are
  hostile input.
- "host" (`host.py`): [`LocalSandbox`], the same private copy, with commands run on the host with `bash -c`. No
  isolation beyond the copy: for trusted tasks only.
- "docker" (`docker.py`): [`DockerSandbox`] runs one container per episode (e.g. an R2E-Gym / SWE-bench image with the
  repository at `/testbed`, no network by default) and talks to it through the `docker` CLI. Every command line is
  built by a small pure method, so it can be checked without a daemon.
- "k8s" (`k8s.py`): [`KubernetesSandbox`] runs one pod per episode from the task's image and talks to it through the
  Kubernetes API (the `[k8s]` extra, imported only when used), one API client per sandbox; [`sweep_stale_pods`]
  deletes the pods that runs which are gone left behind (by label).

All record a base commit when they start; [`Sandbox.diff`] is the agent's patch against it (new files included), and
[`Sandbox.apply_patch`] replays such a patch in another sandbox. Host commands run through [`run_process`]
(`process.py`: time limits, capped output, process groups); the private copies and the prepared checkouts they are
copied from live in `checkout.py`, whose [`sweep_stale_sandboxes`] removes the copies that runs which died without
cleaning up left behind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import (
    COMMAND_ENV,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    FILE_TIMEOUT,
    MAX_LIST_ENTRIES,
    MAX_READ_BYTES,
    CommandResult,
    Sandbox,
    SandboxError,
    ShellSandbox,
    special_file_error,
    too_large_error,
)
from .checkout import MAX_TEMPLATES, SANDBOX_PREFIX, sweep_stale_sandboxes
from .docker import SWEBENCH_SETUP, DockerSandbox, default_docker_setup, sweep_stale_containers
from .host import LocalSandbox, _warn_unisolated
from .k8s import KUBERNETES_MISSING, KubernetesSandbox, require_kubernetes, sweep_stale_pods
from .local import BWRAP_MISSING, SANDBOX_WORKDIR, SYSTEM_PATH, BwrapSandbox, SandboxLimits, require_bwrap
from .process import run_process

if TYPE_CHECKING:
    from ..tasks import Task

SANDBOX_BACKENDS = ("local", "host", "docker", "k8s")


def make_sandbox(backend: str, task: Task, root: str | None = None, lifetime: float | None = None) -> Sandbox:
    """A fresh sandbox for one episode of `task`: "local" an isolated [`BwrapSandbox`] of `task.repo_path` under
    `root`, "host" an unisolated [`LocalSandbox`] (with a warning), "docker" a started [`DockerSandbox`] of
    `task.image` (no network), "k8s" a running [`KubernetesSandbox`] pod of `task.image` (namespace
    `$ENTROPO_K8S_NAMESPACE`). The task's own environment variables are `task.metadata["env"]` (local only).
    `lifetime` (seconds, default a day) bounds a container's or a pod's life, should its run die without removing it."""
    lives = {} if lifetime is None else {"lifetime": lifetime}
    if backend == "k8s":
        if not task.image:
            raise ValueError(f"task {task.instance_id} has no container image")
        setup = task.metadata.get("docker_setup") or default_docker_setup(task.image)
        return KubernetesSandbox(task.image, setup=setup, instance_id=task.instance_id, **lives).start()
    if backend == "docker":
        if not task.image:
            raise ValueError(f"task {task.instance_id} has no Docker image")
        setup = task.metadata.get("docker_setup") or default_docker_setup(task.image)
        sandbox = DockerSandbox(task.image, setup=setup, **lives)
        return sandbox.start()
    if backend not in SANDBOX_BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {', '.join(SANDBOX_BACKENDS)}")
    if not task.repo_path:
        raise ValueError(f"task {task.instance_id} has no local repository (repo_path); use the docker sandbox")
    if backend == "host":
        _warn_unisolated()
        return LocalSandbox(task.repo_path, task.base_commit, root=root)
    env = task.metadata.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"task {task.instance_id}: metadata 'env' must map variable names to strings")
    return BwrapSandbox(task.repo_path, task.base_commit, root=root, env=env)


__all__ = [
    "sweep_stale_containers",
    "default_sandbox_factory",
    "BWRAP_MISSING",
    "COMMAND_ENV",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_TIMEOUT",
    "FILE_TIMEOUT",
    "MAX_LIST_ENTRIES",
    "MAX_READ_BYTES",
    "MAX_TEMPLATES",
    "SANDBOX_BACKENDS",
    "SANDBOX_PREFIX",
    "SANDBOX_WORKDIR",
    "SWEBENCH_SETUP",
    "SYSTEM_PATH",
    "BwrapSandbox",
    "CommandResult",
    "DockerSandbox",
    "KUBERNETES_MISSING",
    "KubernetesSandbox",
    "LocalSandbox",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "ShellSandbox",
    "default_docker_setup",
    "make_sandbox",
    "require_bwrap",
    "require_kubernetes",
    "run_process",
    "special_file_error",
    "sweep_stale_pods",
    "sweep_stale_sandboxes",
    "too_large_error",
]


def default_sandbox_factory(
    backend: str = "local", root: str | None = None, lifetime: float | None = None
) -> Callable[[Task], Sandbox]:
    """A fresh sandbox per episode ([`make_sandbox`]): an isolated private checkout of `task.repo_path` under `root`
    ("local"), the same unisolated ("host"), a container ("docker") or a pod ("k8s") of `task.image` that lives at
    most `lifetime` seconds."""
    if backend not in SANDBOX_BACKENDS:
        raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {backend!r}")
    return functools.partial(make_sandbox, backend, root=root, lifetime=lifetime)
