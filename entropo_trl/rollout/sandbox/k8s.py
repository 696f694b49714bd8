"""The "k8s" backend: [`KubernetesSandbox`], one pod per episode driven through the Kubernetes API (the official
`kubernetes` client, the `[k8s]` extra, imported only when used), and [`sweep_stale_pods`], which deletes the pods that
runs which are gone left behind.

Every pod carries the label `app.kubernetes.io/managed-by: entropo-trl`, its run id, its task's instance id and (when
known) its episode. The client configuration is loaded once per process (in-cluster when the runner is itself a pod,
else the kubeconfig); every sandbox makes its own API client from it and closes it with the pod.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shlex
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from .base import _ENSURE_BASE_SCRIPT, COMMAND_ENV, DEFAULT_MAX_OUTPUT, CommandResult, SandboxError, ShellSandbox
from .process import _Capture, _decode_capped

logger = logging.getLogger(__name__)

KUBERNETES_MISSING = (
    "the k8s sandbox needs the Kubernetes Python client, which is not installed: pip install 'entropo-trl[k8s]'"
)
NAMESPACE_ENV = "ENTROPO_K8S_NAMESPACE"
"""Environment variable naming the namespace of the pods when none is given (default "default")."""
RUN_ID_ENV = "ENTROPO_RUN_ID"
"""Environment variable naming the run id the pods are labelled with (default: one random id per process)."""

MANAGED_BY_LABEL, MANAGED_BY = "app.kubernetes.io/managed-by", "entropo-trl"
RUN_LABEL = "entropo-trl/run-id"
INSTANCE_LABEL = "entropo-trl/instance-id"
EPISODE_LABEL = "entropo-trl/episode"
POD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
"""The label selector of every pod this library makes."""

DEFAULT_REQUESTS = {"cpu": "1", "memory": "2Gi"}
DEFAULT_LIMITS = {"cpu": "2", "memory": "4Gi"}
STALE_PENDING_SECONDS = 3600.0
"""A pod still Pending after this long is abandoned: no sandbox waits that long for its pod (`start_timeout`)."""
# Pod spec fields a caller may add (scheduling and image pulls); everything else of the spec is the sandbox's own.
SPEC_EXTRA_KEYS = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "imagePullSecrets",
    "priorityClassName",
    "runtimeClassName",
)
# Waiting reasons that the kubelet does not retry its way out of: the pod will never run.
_HOPELESS = ("InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError")
_CONTAINER = "sandbox"
_STDOUT, _STDERR, _ERROR = 1, 2, 3  # channels of the exec stream
_PROCESS_RUN_ID = uuid.uuid4().hex[:12]


@functools.cache
def load_configuration():
    """The client configuration, loaded once per process: in-cluster (the pod's service account) when the runner runs
    in a pod, else the kubeconfig (`$KUBECONFIG` or `~/.kube/config`, its current context). `SandboxError` naming the
    `[k8s]` extra when the client is missing, or the cause when no cluster is configured."""
    try:
        from kubernetes import client, config
    except ImportError as error:
        raise SandboxError(KUBERNETES_MISSING) from error
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        return configuration
    except config.ConfigException:
        pass  # not in a pod: the kubeconfig
    try:
        config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as error:
        raise SandboxError(
            f"no Kubernetes cluster configured: not running in a pod, and no usable kubeconfig ($KUBECONFIG or "
            f"~/.kube/config): {error}"
        ) from error
    return configuration


def require_kubernetes() -> None:
    """Check, before any episode starts, that the client is installed and a cluster is configured (`SandboxError`
    otherwise)."""
    load_configuration()


def default_api_factory():
    """A new API client for one sandbox (or one sweep) and the `CoreV1Api` over it: `(api, client)`; the caller closes
    the client. Clients are never shared: each sandbox's calls and its exec streams go through its own."""
    configuration = load_configuration()
    from kubernetes import client

    api_client = client.ApiClient(configuration)
    return client.CoreV1Api(api_client), api_client


def default_namespace() -> str:
    return os.environ.get(NAMESPACE_ENV) or "default"


def default_run_id() -> str:
    """`$ENTROPO_RUN_ID`, else a random id made once per process."""
    return os.environ.get(RUN_ID_ENV) or _PROCESS_RUN_ID


def label_value(text: str) -> str:
    """`text` as a valid label value (at most 63 characters of `[A-Za-z0-9_.-]`, alphanumeric at both ends); a
    shortened or emptied one ends with a hash of `text`, so distinct long ids stay distinct."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    if value and len(value) <= 63:
        return value
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{value[:54].rstrip('-_.')}-{digest}".lstrip("-")


def _api_message(error) -> str:
    """The API server's message in an `ApiException` (its JSON body), else its reason."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"{error.status} {error.reason}: {message}" if message else f"{error.status} {error.reason}"


def _pod_problem(pod) -> tuple[str | None, str]:
    """Why a pod is not (or no longer) running, as the cluster reports it: the pod's reason (DeadlineExceeded,
    Evicted), its container's waiting or terminated state (ImagePullBackOff), or why it is not scheduled. Returns the
    reason and a description of it."""
    status = pod.status
    found = (status.reason, status.message)
    for container in [] if status.reason else status.container_statuses or []:
        waiting, terminated = container.state.waiting, container.state.terminated
        if waiting is not None and waiting.reason:
            found = (waiting.reason, waiting.message)
        elif terminated is not None:
            found = (terminated.reason, f"exit code {terminated.exit_code}")
    for condition in [] if found[0] else status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            found = (condition.reason or "Unschedulable", condition.message)
    reason, message = found
    if reason is None:
        return None, "no reason reported"
    return reason, f"reason {reason}" + (f" ({message})" if message else "")


def _delete_pod(api, name: str, namespace: str) -> bool:
    """Delete a pod at once (grace period 0). False, with a warning, when it could not be deleted; a pod already gone
    counts as deleted."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_pod(name, namespace, grace_period_seconds=0, propagation_policy="Background")
    except Exception as error:  # noqa: BLE001 - closing never fails an episode; a leak is logged
        if isinstance(error, ApiException) and error.status == 404:
            return True
        reason = _api_message(error) if isinstance(error, ApiException) else error
        logger.warning(f"could not delete pod {namespace}/{name}: {reason}; sweep_stale_pods removes it")
        return False
    return True


def _stale_reason(pod, run_label: str | None, max_age: float | None, now: datetime) -> str | None:
    """Why no episode can still use `pod` (see [`sweep_stale_pods`]), None if one may."""
    phase = pod.status.phase
    if phase in ("Succeeded", "Failed"):
        return f"it ended ({phase})"
    age = (now - pod.metadata.creation_timestamp).total_seconds()
    deadline = pod.spec.active_deadline_seconds
    if deadline is not None and age > deadline + STALE_PENDING_SECONDS:
        return f"it is {age:.0f} s old, past its deadline of {deadline} s"
    if phase == "Pending" and age > STALE_PENDING_SECONDS:
        return f"it has been Pending for {age:.0f} s"
    other_run = (pod.metadata.labels or {}).get(RUN_LABEL) != run_label or run_label is None
    if max_age is not None and other_run and age > max_age:
        return f"it is {age:.0f} s old, of another run"
    return None


def sweep_stale_pods(
    namespace: str | None = None,
    run_id: str | None = None,
    max_age: float | None = None,
    api_factory: Callable[[], tuple[Any, Any]] | None = None,
) -> list[str]:
    """Delete the library's pods (label `app.kubernetes.io/managed-by=entropo-trl`) in `namespace` that no episode can
    still use, and return their names. A pod is deleted when

    - it ended (phase Succeeded or Failed: its deadline passed, or its container stopped);
    - it is older than its own `activeDeadlineSeconds` plus `STALE_PENDING_SECONDS` (the deadline counts from the
      pod's start, which comes at most that long after its creation);
    - it is still Pending after `STALE_PENDING_SECONDS` (its sandbox gave up on it long ago: its creator died);
    - `max_age` is given and it belongs to a run other than `run_id` and is older than `max_age` seconds (for a
      caller who knows that no episode lasts that long, or, with `max_age=0`, that no other run shares the namespace).

    The first three rules never touch a pod a live episode uses, whatever its run, so any runner may sweep at start.
    """
    namespace = namespace or default_namespace()
    run_label = None if run_id is None else label_value(run_id)
    api, api_client = (api_factory or default_api_factory)()
    try:
        pods = api.list_namespaced_pod(namespace, label_selector=POD_SELECTOR).items
        now = datetime.now(timezone.utc)
        deleted = []
        for pod in pods:
            reason = _stale_reason(pod, run_label, max_age, now)
            if reason is not None and _delete_pod(api, pod.metadata.name, namespace):
                logger.info(f"deleted pod {namespace}/{pod.metadata.name}: {reason}")
                deleted.append(pod.metadata.name)
        return deleted
    finally:
        api_client.close()


class KubernetesSandbox(ShellSandbox):
    """One pod per episode, from `image` with the repository at `workdir`.

    The pod's container sleeps and every command runs through the exec stream API; inside, `timeout -s KILL` kills
    the command's whole process group at the time limit, and the client stops waiting `HOST_GRACE` seconds later.
    [`start`] (or entering the context) creates the pod, waits until it runs (at most `start_timeout` seconds) and
    records `HEAD` as the base commit (a workdir that is not a git repository is made one); [`close`] deletes it.

    The pod ([`pod_manifest`]) has `requests` / `limits` (cpu, memory, any resource), no service-account token, no
    service environment variables, no privilege escalation, the runtime's default seccomp profile, `restartPolicy:
    Never` and `activeDeadlineSeconds: lifetime` (the episode's time limit plus a margin), so a pod whose runner died
    ends by itself. `spec_extra` adds scheduling and pull settings (`SPEC_EXTRA_KEYS`: e.g. `{"runtimeClassName":
    "gvisor"}`, `{"imagePullSecrets": [{"name": "regcred"}]}`). `setup` runs before every command in the same shell,
    as in [`DockerSandbox`]. Unlike Docker's `--network none`, a pod has the cluster's network unless a NetworkPolicy
    on the label `app.kubernetes.io/managed-by=entropo-trl` denies it. `api_factory()` returns `(CoreV1Api, client)`,
    a fresh client per sandbox, closed on close (default: [`default_api_factory`]).
    """

    HOST_GRACE = 15.0  # extra seconds the client waits for an exec beyond the command's own limit
    POLL_INTERVAL = 1.0  # seconds between two looks at a starting pod
    STDIN_CHUNK = 1 << 20  # bytes per stdin frame

    def __init__(
        self,
        image: str,
        workdir: str = "/testbed",
        namespace: str | None = None,
        setup: str | None = None,
        lifetime: float = 86_400.0,
        run_id: str | None = None,
        instance_id: str | None = None,
        episode: str | None = None,
        requests: Mapping[str, str] = DEFAULT_REQUESTS,
        limits: Mapping[str, str] = DEFAULT_LIMITS,
        spec_extra: Mapping[str, Any] | None = None,
        start_timeout: float = 600.0,
        name: str | None = None,
        api_factory: Callable[[], tuple[Any, Any]] | None = None,
    ):
        unknown = sorted(set(spec_extra or {}) - set(SPEC_EXTRA_KEYS))
        if unknown:
            raise ValueError(f"spec_extra may set only {', '.join(SPEC_EXTRA_KEYS)}; got {', '.join(unknown)}")
        if not 0 < start_timeout < STALE_PENDING_SECONDS:
            raise ValueError(f"start_timeout must be between 0 and {STALE_PENDING_SECONDS:g} s, got {start_timeout}")
        self.image, self.setup, self.lifetime = image, setup, lifetime
        self.workdir = posixpath.normpath(workdir)
        self.namespace = namespace or default_namespace()
        self.run_id, self.instance_id, self.episode = run_id or default_run_id(), instance_id, episode
        self.requests, self.limits, self.spec_extra = dict(requests), dict(limits), dict(spec_extra or {})
        self.start_timeout = start_timeout
        self.name = name or f"entropo-{uuid.uuid4().hex[:12]}"
        self._where = f"{self.namespace}/{self.name}"  # for messages
        self.base_commit = ""
        self._api_factory = api_factory or default_api_factory
        self._api = self._client = None
        self._created = self._started = False
        self._owner_pid = os.getpid()

    # ---- the pod and the command lines (pure)

    def labels(self) -> dict[str, str]:
        ids = {key: label_value(value) for key, value in self._ids().items()}
        return {MANAGED_BY_LABEL: MANAGED_BY, RUN_LABEL: label_value(self.run_id), **ids}

    def _ids(self) -> dict[str, str]:
        """The task's instance id and the episode, those that are known."""
        return {
            key: value for key, value in ((INSTANCE_LABEL, self.instance_id), (EPISODE_LABEL, self.episode)) if value
        }

    def pod_manifest(self) -> dict[str, Any]:
        """The pod to create. Labels hold sanitised ids; the annotations hold them in full."""
        container = {
            "name": _CONTAINER,
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", str(max(1, math.ceil(self.lifetime)))],
            "workingDir": self.workdir,
            "resources": {"requests": dict(self.requests), "limits": dict(self.limits)},
            "securityContext": {"privileged": False, "allowPrivilegeEscalation": False},
        }
        spec = {
            "containers": [container],
            "restartPolicy": "Never",
            "activeDeadlineSeconds": max(1, math.ceil(self.lifetime)),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            **self.spec_extra,
        }
        metadata = {"name": self.name, "labels": self.labels(), "annotations": self._ids()}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}

    def exec_argv(self, command: str, timeout: float | None = None, stdin_bytes: int | None = None) -> list[str]:
        """The exec's argv: `bash -c command` in `workdir` with `COMMAND_ENV`, under `timeout -s KILL` when a time
        limit is given. With `stdin_bytes`, the command reads exactly that many bytes of stdin: an exec stream cannot
        close stdin before the v5 protocol, so `head -c` ends it."""
        script = "\n".join(
            part for part in (f"cd -- {shlex.quote(self.workdir)} || exit 1", self.setup, command) if part
        )
        argv = ["env", *(f"{key}={value}" for key, value in COMMAND_ENV.items())]
        if timeout is not None:
            argv += ["timeout", "-s", "KILL", str(max(1, math.ceil(timeout)))]
        if stdin_bytes is None:
            return [*argv, "bash", "-c", script]
        return [*argv, "bash", "-c", 'head -c "$0" | bash -c "$1"', str(stdin_bytes), script]

    # ---- lifecycle

    def start(self) -> KubernetesSandbox:
        """Create the pod, wait until it runs and record the base commit; on any failure the pod is deleted and
        `SandboxError` says why (the pod, its phase and the cluster's reason)."""
        if self._started:
            return self
        try:
            self._api, self._client = self._api_factory()
            self._create_pod()
            self._wait_running()
            self._started = True
            result = self.run(_ENSURE_BASE_SCRIPT, timeout=300)
            if not result.ok or not result.stdout.split():
                where = f"{self.workdir} of pod {self._where}"
                raise SandboxError(f"could not record the base commit in {where}: {result.stderr.strip()}")
            self.base_commit = result.stdout.split()[-1]
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self):
        return self.start()

    def close(self) -> None:
        """Delete the pod (grace period 0) and close the API client. Safe to call twice."""
        api, api_client = getattr(self, "_api", None), getattr(self, "_client", None)
        self._api = self._client = None
        self._started = False
        try:
            if api is not None and self._created:
                self._created = False
                _delete_pod(api, self.name, self.namespace)
        finally:
            if api_client is not None:
                api_client.close()

    def _create_pod(self) -> None:
        from kubernetes.client.exceptions import ApiException

        self._created = True  # a request that timed out may still have made it: close() deletes it either way
        try:
            self._api.create_namespaced_pod(self.namespace, self.pod_manifest())
        except ApiException as error:
            hint = (
                "; the account needs pods create/get/list/delete and pods/exec create" if error.status == 403 else ""
            )
            raise SandboxError(
                f"could not create pod {self._where} from {self.image}: {_api_message(error)}{hint}"
            ) from error

    def _read_pod(self):
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api.read_namespaced_pod(self.name, self.namespace)
        except ApiException as error:
            raise SandboxError(f"could not read pod {self._where}: {_api_message(error)}") from error

    def _wait_running(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            pod = self._read_pod()
            phase = pod.status.phase or "Unknown"
            if phase == "Running":
                return
            reason, problem = _pod_problem(pod)
            if phase in ("Succeeded", "Failed") or reason in _HOPELESS:
                raise SandboxError(f"pod {self._where} from {self.image} cannot start: {phase}, {problem}")
            if time.monotonic() >= deadline:
                raise SandboxError(
                    f"pod {self._where} from {self.image} was not running after {self.start_timeout:g} s: "
                    f"{phase}, {problem}"
                )
            time.sleep(self.POLL_INTERVAL)

    def _describe_pod(self) -> str:
        """The pod's phase and problem, for an error message (best effort)."""
        try:
            pod = self._read_pod()
        except SandboxError as error:
            return str(error)
        return f"pod {self._where} is {pod.status.phase}, {_pod_problem(pod)[1]}"

    # ---- commands

    def _exec(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT, input: bytes | None = None
    ) -> CommandResult:
        if not self._started:
            raise SandboxError(f"pod {self._where} is not running: call start() first")
        from websocket import WebSocketException

        start = time.monotonic()
        captures = (_Capture(4 * max_output + 4), _Capture(4 * max_output + 4))
        argv = self.exec_argv(command, timeout, None if input is None else len(input))
        stream = self._open_stream(argv, stdin=input is not None)
        try:
            for offset in range(0, len(input or b""), self.STDIN_CHUNK):
                stream.write_stdin(input[offset : offset + self.STDIN_CHUNK])
                _drain(stream, captures)
            timed_out = _read_until_closed(stream, captures, start + timeout + self.HOST_GRACE)
            status = b"" if timed_out else stream.read_channel(_ERROR)
        except (OSError, WebSocketException) as error:
            raise SandboxError(f"lost the exec stream to pod {self._where}: {error}") from error
        finally:
            stream.close()
        duration = time.monotonic() - start
        exit_code = -1 if timed_out else self._exit_code(status)
        # `timeout -s KILL` kills its whole group, itself included: the exec reports 137 (128 + SIGKILL).
        if exit_code == 137 and duration >= timeout:
            exit_code, timed_out = -1, True
        stdout, stderr = (_decode_capped(capture, max_output) for capture in captures)
        return CommandResult(exit_code, stdout, stderr, timed_out=timed_out, duration=duration)

    def _open_stream(self, argv: list[str], stdin: bool):
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import stream

        try:
            return stream(
                self._api.connect_get_namespaced_pod_exec, self.name, self.namespace, command=argv,
                container=_CONTAINER, stdin=stdin, stdout=True, stderr=True, tty=False, _preload_content=False,
                binary=True,
            )  # fmt: skip
        except ApiException as error:
            raise SandboxError(
                f"could not exec in pod {self._where} ({self._describe_pod()}): {error.reason}"
            ) from error

    def _exit_code(self, status: bytes | str) -> int:
        """The exit code in the exec's status (its error channel: a JSON `Status`)."""
        if not status:
            raise SandboxError(f"the exec in pod {self._where} ended without an exit status ({self._describe_pod()})")
        try:
            parsed = json.loads(status)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise SandboxError(f"the exec in pod {self._where} failed: {status!r}")
        if parsed.get("status") == "Success":
            return 0
        for cause in (parsed.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
        raise SandboxError(f"the exec in pod {self._where} failed: {parsed.get('message') or status!r}")


def _drain(stream, captures: tuple[_Capture, _Capture]) -> None:
    """Move what the stream has received on stdout and stderr into the captures."""
    for channel, capture in zip((_STDOUT, _STDERR), captures):
        data = stream.read_channel(channel)
        if data:
            capture.add(data.encode("utf-8") if isinstance(data, str) else data)


def _read_until_closed(stream, captures: tuple[_Capture, _Capture], deadline: float) -> bool:
    """Read the stream until the server closes it (the command ended) or the deadline; True if the deadline passed."""
    while stream.is_open():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        stream.update(timeout=min(remaining, 1.0))
        _drain(stream, captures)
    _drain(stream, captures)
    return False
