"""The Kubernetes sandbox against a fake `CoreV1Api` that records its calls: the pod manifest, the call sequence
(create, read until Running, exec, delete), exec time limits and output caps, pods that never start, deletion after
errors, one API client per sandbox, the sweep by label, and make_sandbox("k8s"). The exec stream of the fake runs the
command on this machine, so the file operations' shell snippets run for real. One test uses a real cluster when
`ENTROPO_K8S_TEST_NAMESPACE` names a namespace and a kubeconfig loads."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

pytest.importorskip("kubernetes", reason="the [k8s] extra is not installed")
from kubernetes.client.exceptions import ApiException  # noqa: E402

from entropo_trl.rollout.sandbox import (  # noqa: E402
    SANDBOX_BACKENDS,
    SWEBENCH_SETUP,
    KubernetesSandbox,
    SandboxError,
    k8s,
    make_sandbox,
    require_kubernetes,
    sweep_stale_pods,
)
from entropo_trl.rollout.tasks import Task  # noqa: E402

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def make_repo(path):
    """A small repository folder (not yet a git repository: the sandbox makes it one)."""
    (path / "pkg").mkdir(parents=True)
    (path / "pkg" / "__init__.py").write_text("")
    (path / "pkg" / "core.py").write_text("def add(a, b):\n    return a + b\n")
    return path


# ------------------------------------------------------------------------------------------------------ the fakes


def exit_status(code: int) -> bytes:
    """The error channel's last message, as the API server sends it."""
    if code == 0:
        return json.dumps({"metadata": {}, "status": "Success"}).encode()
    return json.dumps({
        "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }).encode()  # fmt: skip


class LocalExecStream:
    """A stand-in for the exec stream (`WSClient` with `binary=True`) that runs the argv on this machine: stdout and
    stderr as they come, then the exit status on the error channel, then the close. Like a v4 stream, it never closes
    the command's stdin."""

    def __init__(self, argv, stdin):
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.frames, self.channels, self.open, self.closed = queue.Queue(), {}, True, False
        self.pumps = [
            threading.Thread(target=self._pump, args=pair) for pair in ((self.proc.stdout, 1), (self.proc.stderr, 2))
        ]
        for pump in self.pumps:
            pump.start()
        threading.Thread(target=self._finish, daemon=True).start()

    def _pump(self, pipe, channel):
        for chunk in iter(lambda: pipe.read1(65536), b""):
            self.frames.put((channel, chunk))

    def _finish(self):
        for pump in self.pumps:
            pump.join()
        code = self.proc.wait()
        self.frames.put((3, exit_status(128 - code if code < 0 else code)))  # killed by a signal: 128 + signal
        self.frames.put(None)

    def update(self, timeout=0):
        try:
            frame = self.frames.get(timeout=timeout) if timeout else self.frames.get_nowait()
            while frame is not None:
                self.channels[frame[0]] = self.channels.get(frame[0], b"") + frame[1]
                frame = self.frames.get_nowait()
            self.open = False
        except queue.Empty:
            pass

    def read_channel(self, channel, timeout=0):
        if channel not in self.channels:
            self.update(timeout)
        return self.channels.pop(channel, b"")

    def is_open(self):
        return self.open

    def write_stdin(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self):
        self.open, self.closed = False, True
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


class ScriptedStream:
    """An exec stream that answers with fixed frames, then closes (or stays open when `hang`)."""

    def __init__(self, stdout=b"", status=b"", hang=False):
        self.channels = {1: stdout, 3: status}
        self.hang, self.closed = hang, False

    def update(self, timeout=0):
        if self.hang:
            time.sleep(min(timeout, 0.05))

    def read_channel(self, channel, timeout=0):
        return self.channels.pop(channel, b"")

    def is_open(self):
        return self.hang and not self.closed

    def write_stdin(self, data):
        pass

    def close(self):
        self.closed = True


class FakeApiClient:
    """Closeable, with what `kubernetes.stream.stream` swaps while it calls the exec method."""

    configuration = None
    call_api = request = None

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def pod(name, phase, run="other", age=60.0, deadline=3600, waiting=None, unscheduled=None):
    """A pod as the client returns it (only the fields the sandbox reads)."""
    state = SimpleNamespace(waiting=SimpleNamespace(reason=waiting, message=f"{waiting}: details"), terminated=None)
    conditions = [SimpleNamespace(type="PodScheduled", status="False", reason="Unschedulable", message=unscheduled)]
    created = datetime.now(timezone.utc) - timedelta(seconds=age)
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, labels={k8s.RUN_LABEL: run}, creation_timestamp=created),
        spec=SimpleNamespace(active_deadline_seconds=deadline),
        status=SimpleNamespace(
            phase=phase, reason=None, message=None,
            container_statuses=[SimpleNamespace(state=state)] if waiting else [],
            conditions=conditions if unscheduled else [],
        ),
    )  # fmt: skip


class FakeCoreV1Api:
    """Records every call in its cluster's `calls` (tagged with this api's number). A pod goes through the cluster's
    `phases` as it is read (the last one stays); exec returns `cluster.exec_stream(argv, stdin)`."""

    def __init__(self, cluster, api_client, number):
        self.cluster, self.api_client, self.number = cluster, api_client, number
        self.reads = 0

    def _record(self, *call):
        self.cluster.calls.append((call[0], self.number, *call[1:]))

    def create_namespaced_pod(self, namespace, body):
        self._record("create", namespace, body)
        if self.cluster.create_error is not None:
            raise self.cluster.create_error
        self.cluster.pods.add(body["metadata"]["name"])

    def read_namespaced_pod(self, name, namespace):
        self._record("read", name)
        if name not in self.cluster.pods:
            raise ApiException(status=404, reason="Not Found")
        phases = self.cluster.phases
        phase = phases[min(self.reads, len(phases) - 1)]
        self.reads += 1
        return pod(name, phase, waiting=self.cluster.waiting if phase == "Pending" else None)

    def connect_get_namespaced_pod_exec(self, name, namespace, **kwargs):
        self._record("exec", name, kwargs["command"], kwargs["stdin"])
        stream = self.cluster.exec_stream(kwargs["command"], kwargs["stdin"])
        self.cluster.streams.append(stream)
        return stream

    def delete_namespaced_pod(self, name, namespace, **kwargs):
        self._record("delete", name, kwargs)
        if self.cluster.delete_error is not None:
            raise self.cluster.delete_error
        if name not in self.cluster.pods:
            raise ApiException(status=404, reason="Not Found")
        self.cluster.pods.discard(name)

    def list_namespaced_pod(self, namespace, label_selector):
        self._record("list", namespace, label_selector)
        return SimpleNamespace(items=self.cluster.listed)


class FakeCluster:
    """What the fake APIs share: the calls, the pods, the clients handed out (one per `api_factory()` call)."""

    def __init__(self, phases=("Pending", "Running"), waiting=None, exec_stream=LocalExecStream):
        self.phases, self.waiting, self.exec_stream = phases, waiting, exec_stream
        self.calls, self.clients, self.streams, self.pods, self.listed = [], [], [], set(), []
        self.create_error = self.delete_error = None

    def api_factory(self):
        client = FakeApiClient()
        self.clients.append(client)
        return FakeCoreV1Api(self, client, len(self.clients)), client

    def kinds(self):
        return [call[0] for call in self.calls]


def sandbox(cluster, workdir="/testbed", **kwargs):
    box = KubernetesSandbox("img:1", workdir=str(workdir), api_factory=cluster.api_factory, **kwargs)
    box.POLL_INTERVAL = 0.01
    return box


# --------------------------------------------------------------------------------------------------- the manifest


def test_pod_manifest():
    box = KubernetesSandbox(
        "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest", namespace="rollouts", lifetime=5000.5,
        run_id="run 7", instance_id="astropy__astropy-12907", episode="astropy__astropy-12907/model/3", name="ep1",
        spec_extra={"runtimeClassName": "gvisor"},
    )  # fmt: skip
    manifest = box.pod_manifest()
    assert manifest["metadata"]["name"] == "ep1" and manifest["kind"] == "Pod"
    assert manifest["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "entropo-trl",
        "entropo-trl/run-id": "run-7",
        "entropo-trl/instance-id": "astropy__astropy-12907",
        "entropo-trl/episode": "astropy__astropy-12907-model-3",
    }
    assert manifest["metadata"]["annotations"]["entropo-trl/episode"] == "astropy__astropy-12907/model/3"
    spec = manifest["spec"]
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 5001
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["runtimeClassName"] == "gvisor" and spec["terminationGracePeriodSeconds"] == 0
    assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC", "serviceAccountName"))
    (container,) = spec["containers"]
    assert container["image"] == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert container["command"] == ["sleep", "5001"] and container["workingDir"] == "/testbed"
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert container["securityContext"] == {"privileged": False, "allowPrivilegeEscalation": False}
    custom = KubernetesSandbox("img", requests={"cpu": "500m"}, limits={"memory": "1Gi"}).pod_manifest()
    assert custom["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}}
    assert "entropo-trl/episode" not in custom["metadata"]["labels"]  # unknown: no label
    assert KubernetesSandbox("img").name != KubernetesSandbox("img").name
    with pytest.raises(ValueError, match="spec_extra may set only .*hostNetwork"):
        KubernetesSandbox("img", spec_extra={"hostNetwork": True})
    with pytest.raises(ValueError, match="start_timeout"):
        KubernetesSandbox("img", start_timeout=7200)


def test_the_real_client_keeps_every_field_of_the_manifest():
    """The manifest goes through the client's own validation and serialisation unchanged: no misspelt field is
    dropped on the way (the client silently drops unknown ones)."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"
    api_client = client.ApiClient(configuration)
    sent = {}

    def call_api(method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        sent.update(method=method, url=url, body=body)
        raise ConnectionRefusedError("no cluster here")

    api_client.call_api = call_api
    manifest = KubernetesSandbox(
        "img", instance_id="a/b", episode="a/b/m/0", spec_extra={"nodeSelector": {"x": "y"}}
    ).pod_manifest()
    with pytest.raises(ConnectionRefusedError):
        client.CoreV1Api(api_client).create_namespaced_pod("ns", manifest)
    assert sent["method"] == "POST" and sent["url"].endswith("/api/v1/namespaces/ns/pods")
    assert json.loads(json.dumps(sent["body"])) == manifest
    api_client.close()


def test_label_values():
    assert k8s.label_value("django__django-11099") == "django__django-11099"
    assert k8s.label_value("owner/repo-1/model:x/0") == "owner-repo-1-model-x-0"
    long_a, long_b = "a" * 70 + "/0", "a" * 70 + "/1"
    assert len(k8s.label_value(long_a)) <= 63 and k8s.label_value(long_a) != k8s.label_value(long_b)
    for text in (long_a, "///", "-x-", "é", "a" * 63):
        assert LABEL_VALUE.match(k8s.label_value(text)) and k8s.label_value(text), text


# ------------------------------------------------------------------------------------------------ the call sequence


def test_an_episode_is_create_read_until_running_exec_delete(tmp_path):
    workdir = make_repo(tmp_path / "testbed")
    cluster = FakeCluster(phases=("Pending", "Pending", "Running"))
    with sandbox(cluster, workdir, namespace="ns", instance_id="t-1") as box:
        assert len(box.base_commit) == 40
        assert cluster.kinds() == ["create", "read", "read", "read", "exec"]
        assert cluster.calls[0][2] == "ns" and cluster.calls[0][3] == box.pod_manifest()
        result = box.run("echo $PAGER; pwd; echo oops >&2; exit 3")
        assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (
            3,
            f"cat\n{workdir}\n",
            "oops\n",
            False,
        )
        box.write_file("pkg/new/mod.py", "héllo = 1\n")
        assert box.read_file(str(workdir / "pkg/new/mod.py")) == "héllo = 1\n"
        assert box.exists("pkg/new") and box.is_dir("pkg/new") and not box.exists("missing")
        with pytest.raises(FileNotFoundError):
            box.read_file("missing")
        assert box.list_dir("pkg") == ["__init__.py", "core.py", "new/", "new/mod.py"]
        patch = box.diff()
        assert "+héllo = 1" in patch
    assert cluster.kinds()[-1] == "delete" and cluster.calls[-1][3] == {
        "grace_period_seconds": 0, "propagation_policy": "Background"
    }  # fmt: skip
    assert cluster.pods == set() and cluster.clients[0].closed and all(stream.closed for stream in cluster.streams)
    writes = [call for call in cluster.calls if call[0] == "exec" and call[4]]
    assert len(writes) == 1 and writes[0][3][-3:-1] == ['head -c "$0" | bash -c "$1"', "16"]  # base64 of the file
    # the patch replays in a fresh pod of the same task (stdin of 0.5 MiB: read to its last byte)
    make_repo(tmp_path / "other")
    with sandbox(cluster, tmp_path / "other") as other:
        big = "x" * (1 << 19)
        other.write_file("big.txt", big)
        assert other.read_file("big.txt") == big
        assert other.apply_patch(patch).ok and other.read_file("pkg/new/mod.py") == "héllo = 1\n"
    box.close()  # twice: nothing more happens
    assert cluster.kinds().count("delete") == 2


def test_exec_argv_carries_the_environment_the_workdir_and_the_time_limit():
    box = KubernetesSandbox("img", workdir="/work dir/", setup=SWEBENCH_SETUP)
    argv = box.exec_argv("ls -la", timeout=12.5)
    assert argv[0] == "env" and "PAGER=cat" in argv and "TERM=dumb" in argv
    assert argv[argv.index("timeout") :][:4] == ["timeout", "-s", "KILL", "13"]
    assert argv[-3:-1] == ["bash", "-c"] and argv[-1] == f"cd -- '/work dir' || exit 1\n{SWEBENCH_SETUP}\nls -la"
    assert "timeout" not in box.exec_argv("ls")


def test_exec_time_limit_and_output_cap(tmp_path):
    cluster = FakeCluster(phases=("Running",))
    with sandbox(cluster, make_repo(tmp_path / "testbed")) as box:
        started = time.monotonic()
        result = box.run("echo hi; sleep 30", timeout=1)
        assert result.timed_out and result.exit_code == -1 and result.stdout == "hi\n"
        assert time.monotonic() - started < 10
        flood = box.run("head -c 300000 /dev/zero | tr '\\0' a; echo; echo end", max_output=1000)
        assert flood.ok and len(flood.stdout) < 1100 and "output truncated" in flood.stdout
        assert flood.stdout.startswith("a" * 400) and flood.stdout.endswith("end\n")
        # a command that the OOM killer ends early is not a time limit
        assert box.run("kill -KILL $$", timeout=30).exit_code == 137


def test_a_stream_that_never_ends_is_cut_at_the_time_limit_plus_grace():
    cluster = FakeCluster(
        phases=("Running",), exec_stream=lambda argv, stdin: ScriptedStream(b"abc123\n", exit_status(0))
    )
    box = sandbox(cluster).start()
    cluster.exec_stream = lambda argv, stdin: ScriptedStream(b"partial", hang=True)
    box.HOST_GRACE = 0.2
    started = time.monotonic()
    result = box.run("anything", timeout=0.3)
    assert result.timed_out and result.exit_code == -1 and result.stdout == "partial"
    assert 0.5 <= time.monotonic() - started < 3 and cluster.streams[-1].closed
    box.close()
    assert cluster.kinds()[-1] == "delete"


def test_exec_failures_are_sandbox_errors_naming_the_pod(tmp_path):
    cluster = FakeCluster(
        phases=("Running",), exec_stream=lambda argv, stdin: ScriptedStream(b"abc123\n", exit_status(0))
    )
    box = sandbox(cluster, name="ep-9").start()
    cluster.exec_stream = lambda argv, stdin: ScriptedStream(b"", b"")  # the stream dropped: no status
    with pytest.raises(SandboxError, match="ep-9 ended without an exit status .*Running"):
        box.run("true")
    not_found = {"status": "Failure", "message": 'exec: "bash": executable file not found in $PATH'}
    cluster.exec_stream = lambda argv, stdin: ScriptedStream(b"", json.dumps(not_found).encode())
    with pytest.raises(SandboxError, match="executable file not found"):
        box.run("true")
    box.close()
    assert cluster.kinds()[-1] == "delete" and cluster.clients[0].closed
    with pytest.raises(SandboxError, match="not running"):
        box.run("true")


# ------------------------------------------------------------------------------------------ pods that do not start


@pytest.mark.parametrize(
    ("waiting", "timeout", "match"),
    [("ImagePullBackOff", 0.3, "was not running after 0.3 s: Pending, reason ImagePullBackOff"),
     ("InvalidImageName", 60, "cannot start: Pending, reason InvalidImageName")],
)  # fmt: skip
def test_a_pod_that_never_starts_is_a_clear_error_and_is_deleted(waiting, timeout, match, monkeypatch):
    monkeypatch.delenv("ENTROPO_K8S_NAMESPACE", raising=False)
    cluster = FakeCluster(phases=("Pending",), waiting=waiting)
    started = time.monotonic()
    with pytest.raises(SandboxError, match=f"pod default/ep-2 from img:1 {match}"):
        sandbox(cluster, name="ep-2", start_timeout=timeout).start()
    assert time.monotonic() - started < 5
    assert cluster.kinds()[0] == "create" and cluster.kinds()[-1] == "delete" and "exec" not in cluster.kinds()
    assert cluster.pods == set() and cluster.clients[0].closed


def test_failed_pods_unschedulable_pods_and_refused_creates():
    cluster = FakeCluster(phases=("Failed",))
    with pytest.raises(SandboxError, match="cannot start: Failed"):
        sandbox(cluster).start()
    assert cluster.kinds()[-1] == "delete"
    reason = pod("p", "Pending", unscheduled="0/3 nodes are available: 3 Insufficient cpu.")
    assert k8s._pod_problem(reason) == (
        "Unschedulable",
        "reason Unschedulable (0/3 nodes are available: 3 Insufficient cpu.)",
    )
    cluster = FakeCluster()
    cluster.create_error = ApiException(status=403, reason="Forbidden")
    with pytest.raises(SandboxError, match="403 Forbidden; the account needs pods create/get/list/delete"):
        sandbox(cluster).start()
    # a create that failed may still have made the pod: it is deleted all the same (404 if not)
    assert cluster.kinds() == ["create", "delete"] and cluster.clients[0].closed


def test_the_pod_is_deleted_after_a_failed_start_and_a_failed_delete_is_logged(tmp_path, caplog):
    cluster = FakeCluster(phases=("Running",), exec_stream=lambda argv, stdin: ScriptedStream(b"", exit_status(128)))
    with pytest.raises(SandboxError, match="could not record the base commit"):
        sandbox(cluster).start()
    assert cluster.kinds()[-1] == "delete" and cluster.pods == set()
    cluster = FakeCluster(
        phases=("Running",), exec_stream=lambda argv, stdin: ScriptedStream(b"abc\n", exit_status(0))
    )
    box = sandbox(cluster, name="ep-3").start()
    cluster.delete_error = ApiException(status=500, reason="Internal Server Error")
    box.close()  # does not raise: the episode's result stands
    assert "could not delete pod default/ep-3: 500" in caplog.text and cluster.clients[0].closed


def test_one_api_client_per_sandbox(tmp_path):
    cluster = FakeCluster(phases=("Running",))
    first = sandbox(cluster, make_repo(tmp_path / "a")).start()
    second = sandbox(cluster, make_repo(tmp_path / "b")).start()
    assert len(cluster.clients) == 2 and cluster.clients[0] is not cluster.clients[1]
    first.run("true")
    second.run("true")
    by_api = {
        number: {call[2] for call in cluster.calls if call[1] == number and call[0] == "exec"} for number in (1, 2)
    }
    assert by_api == {1: {first.name}, 2: {second.name}}  # each sandbox's calls go through its own client
    first.close()
    assert cluster.clients[0].closed and not cluster.clients[1].closed
    second.close()
    assert cluster.clients[1].closed


# --------------------------------------------------------------------------------------------------------- the sweep


def test_sweep_deletes_only_pods_no_episode_can_use():
    cluster = FakeCluster()
    cluster.listed = [
        pod("ended", "Failed", run="mine"),
        pod("young-other", "Running", run="other", age=600),
        pod("past-deadline", "Running", run="mine", age=3600 + 3601, deadline=3600),
        pod("pending-long", "Pending", run="other", age=3601, deadline=86400),
        pod("old-other", "Running", run="other", age=7200, deadline=86400),
        pod("old-mine", "Running", run="mine", age=7200, deadline=86400),
    ]
    cluster.pods = {item.metadata.name for item in cluster.listed}
    assert sweep_stale_pods("ns", api_factory=cluster.api_factory) == ["ended", "past-deadline", "pending-long"]
    assert cluster.calls[0] == ("list", 1, "ns", "app.kubernetes.io/managed-by=entropo-trl")
    assert cluster.clients[0].closed
    # knowing that episodes last less than an hour: other runs' older pods go, this run's stay
    cluster.listed = [item for item in cluster.listed if item.metadata.name in cluster.pods]
    assert sweep_stale_pods("ns", run_id="mine", max_age=3600, api_factory=cluster.api_factory) == ["old-other"]
    assert cluster.pods == {"young-other", "old-mine"} and cluster.clients[1].closed


# ------------------------------------------------------------------------------------------ make_sandbox, the extra


def test_make_sandbox_k8s(monkeypatch):
    assert "k8s" in SANDBOX_BACKENDS
    with pytest.raises(ValueError, match="no container image"):
        make_sandbox("k8s", Task("t", "issue"))
    cluster = FakeCluster(
        phases=("Running",), exec_stream=lambda argv, stdin: ScriptedStream(b"abc123\n", exit_status(0))
    )
    monkeypatch.setattr(k8s, "default_api_factory", cluster.api_factory)
    monkeypatch.setenv("ENTROPO_K8S_NAMESPACE", "rollouts")
    monkeypatch.setenv("ENTROPO_RUN_ID", "run-42")
    image = "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    box = make_sandbox("k8s", Task("django__django-11099", "issue", image=image))
    assert isinstance(box, KubernetesSandbox) and box.base_commit == "abc123" and box.setup == SWEBENCH_SETUP
    (create,) = [call for call in cluster.calls if call[0] == "create"]
    assert create[2] == "rollouts" and create[3]["spec"]["containers"][0]["image"] == image
    assert create[3]["metadata"]["labels"]["entropo-trl/instance-id"] == "django__django-11099"
    assert create[3]["metadata"]["labels"]["entropo-trl/run-id"] == "run-42"
    box.close()
    assert cluster.kinds()[-1] == "delete"


def test_missing_client_or_cluster_is_a_clear_error(monkeypatch, tmp_path):
    k8s.load_configuration.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "kubernetes", None)
        with pytest.raises(SandboxError, match=re.escape("pip install 'entropo-trl[k8s]'")):
            require_kubernetes()
        monkeypatch.delitem(sys.modules, "kubernetes")
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
        with pytest.raises(SandboxError, match="no Kubernetes cluster configured"):
            require_kubernetes()
    finally:
        k8s.load_configuration.cache_clear()


def test_importing_the_sandboxes_does_not_import_kubernetes():
    code = "import sys, entropo_trl.rollout.sandbox; print([m for m in sys.modules if m.startswith('kubernetes')])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# ------------------------------------------------------------------------------- the real client, a stand-in server


class StandInApiServer:
    """The few Kubernetes API routes a sandbox uses, on 127.0.0.1, for the real client: pods are created, read (Pending
    once, then Running) and deleted; exec speaks the v4 channel protocol over a websocket (binary frames prefixed with
    their channel; stdin is never closed) and runs the command on this machine."""

    def __init__(self):
        import asyncio

        from aiohttp import web

        self.pods, self.requests, self.reads = {}, [], {}
        app = web.Application()
        pods = "/api/v1/namespaces/{namespace}/pods"
        app.router.add_post(pods, self.create)
        app.router.add_get(pods + "/{name}", self.read)
        app.router.add_delete(pods + "/{name}", self.delete)
        app.router.add_get(pods + "/{name}/exec", self.exec)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def stop(self):
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def create(self, request):
        from aiohttp import web

        body = await request.json()
        self.requests.append(("create", body["metadata"]["name"]))
        body["metadata"]["creationTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.pods[body["metadata"]["name"]] = body
        return web.json_response(body, status=201)

    async def read(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        self.requests.append(("read", name))
        if name not in self.pods:
            return web.json_response({"kind": "Status", "message": f'pods "{name}" not found'}, status=404)
        self.reads[name] = self.reads.get(name, 0) + 1
        return web.json_response(
            {**self.pods[name], "status": {"phase": "Pending" if self.reads[name] == 1 else "Running"}}
        )

    async def delete(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        self.requests.append(("delete", name, request.query.get("gracePeriodSeconds")))
        return web.json_response(self.pods.pop(name))

    async def exec(self, request):
        import asyncio

        from aiohttp import web

        argv, stdin = request.query.getall("command"), request.query.get("stdin") == "true"
        self.requests.append(("exec", request.match_info["name"], stdin))
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip

        async def pump(pipe, channel):
            while chunk := await pipe.read(65536):
                await ws.send_bytes(bytes([channel]) + chunk)

        async def feed():
            async for message in ws:
                if message.data[:1] == b"\x00":
                    proc.stdin.write(message.data[1:])

        feeding = asyncio.ensure_future(feed()) if stdin else None
        await asyncio.gather(pump(proc.stdout, 1), pump(proc.stderr, 2))
        code = await proc.wait()
        await ws.send_bytes(b"\x03" + exit_status(128 - code if code < 0 else code))
        if feeding is not None:
            feeding.cancel()
        await ws.close()
        return ws


def test_an_episode_through_the_real_client_and_exec_stream(tmp_path):
    """The real `CoreV1Api`, `stream` and websocket client against the stand-in server: pods parsed from JSON, the
    stdin of file writes (4 MiB, in several frames), binary output, exit codes and the time limit."""
    from kubernetes import client

    server = StandInApiServer()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.port}"
    clients = []

    def api_factory():
        clients.append(client.ApiClient(configuration))
        return client.CoreV1Api(clients[-1]), clients[-1]

    try:
        box = KubernetesSandbox("img", workdir=str(make_repo(tmp_path / "testbed")), api_factory=api_factory)
        box.POLL_INTERVAL = 0.01
        with box:
            assert len(box.base_commit) == 40
            assert [request[0] for request in server.requests] == ["create", "read", "read", "exec"]
            result = box.run("printf 'caf\\303\\251'; echo oops >&2; exit 4")
            assert (result.stdout, result.stderr, result.exit_code) == ("café", "oops\n", 4)
            big = "é" * (1 << 21)
            box.write_file("pkg/big.txt", big)
            assert box.read_file("pkg/big.txt") == big and "+++ b/pkg/big.txt" in box.diff()
            assert box.run("sleep 30", timeout=1).timed_out
        assert server.requests[-1] == ("delete", box.name, "0") and not server.pods
        assert len(clients) == 1
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ a real cluster


def _cluster_namespace() -> str | None:
    namespace = os.environ.get("ENTROPO_K8S_TEST_NAMESPACE")
    if not namespace:
        return None
    try:
        require_kubernetes()
    except SandboxError:
        return None
    return namespace


@pytest.mark.slow
@pytest.mark.skipif(_cluster_namespace() is None, reason="no cluster: set ENTROPO_K8S_TEST_NAMESPACE and a kubeconfig")
def test_real_cluster_episode():
    namespace = _cluster_namespace()
    image = os.environ.get("ENTROPO_K8S_TEST_IMAGE", "buildpack-deps:bookworm-scm")  # bash and git
    box = KubernetesSandbox(image, workdir="/work", namespace=namespace, instance_id="k8s-test", episode="k8s-test/0")
    with box:
        assert len(box.base_commit) == 40
        assert box.run("echo hello").stdout == "hello\n"
        box.write_file("pkg/mod.py", "x = 1\n")
        assert box.read_file("pkg/mod.py") == "x = 1\n" and "+x = 1" in box.diff()
        assert box.run("sleep 30", timeout=2).timed_out
    api, api_client = k8s.default_api_factory()
    try:
        remaining = api.read_namespaced_pod(box.name, namespace)
    except ApiException as error:
        assert error.status == 404
    else:
        assert remaining.metadata.deletion_timestamp is not None  # deleted, going away
    finally:
        api_client.close()
