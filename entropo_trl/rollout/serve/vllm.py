"""vLLM's OpenAI-compatible server in a subprocess: [`VLLMServerArgs`] says how to run it, [`start_vllm_server`]
launches `vllm serve` in its own process group and waits until it answers."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import ServerHandle, wait_until_healthy

__all__ = ["VLLMServerArgs", "start_vllm_server", "vllm_serve_command"]

logger = logging.getLogger(__name__)


@dataclass
class VLLMServerArgs:
    """How to run `vllm serve`: the one list of its arguments, from which the command line and the client's address
    are built.

    Parameters:
        model (`str`):
            The model to serve: a Hub id or a local path.
        port (`int`, defaults to `8000`):
            The port to listen on.
        host (`str`, defaults to `"127.0.0.1"`):
            The address to listen on (`"0.0.0.0"` or `"::"`: every interface; clients then connect on loopback).
        tensor_parallel_size (`int`, defaults to `1`):
            GPUs each copy of the model is split over.
        data_parallel_size (`int`, defaults to `1`):
            Copies of the model.
        max_model_len (`int`, defaults to `65536`):
            The context window in tokens (prompt and completion).
        gpu_memory_utilization (`float`, defaults to `0.9`):
            The share of each GPU's memory vLLM may take.
        served_model_name (`str` or `None`, defaults to `None`):
            The name clients ask for (default: `model`).
        extra_args (`Sequence[str]`, defaults to `()`):
            More `vllm serve` arguments, appended verbatim.
    """

    model: str
    port: int = 8000
    host: str = "127.0.0.1"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int = 65536
    gpu_memory_utilization: float = 0.9
    served_model_name: str | None = None
    extra_args: Sequence[str] = ()

    def command(self, executable: str = "vllm") -> list[str]:
        """The `vllm serve` command line, run with `executable`."""
        flags = {
            "--host": self.host,
            "--port": self.port,
            "--tensor-parallel-size": self.tensor_parallel_size,
            "--data-parallel-size": self.data_parallel_size,
            "--max-model-len": self.max_model_len,
            "--gpu-memory-utilization": self.gpu_memory_utilization,
        }
        if self.served_model_name is not None:
            flags["--served-model-name"] = self.served_model_name
        command = [executable, "serve", self.model]
        for flag, value in flags.items():
            command += [flag, str(value)]
        return command + [str(arg) for arg in self.extra_args]

    @property
    def base_url(self) -> str:
        """The API root clients use: on loopback when the server listens on every interface."""
        connect_host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        if ":" in connect_host:
            connect_host = f"[{connect_host}]"
        return f"http://{connect_host}:{self.port}/v1"


def _server_args(model: str | VLLMServerArgs, server_args: dict[str, Any]) -> VLLMServerArgs:
    """`model` with the [`VLLMServerArgs`] fields in `server_args` set."""
    if isinstance(model, VLLMServerArgs):
        return dataclasses.replace(model, **server_args)
    return VLLMServerArgs(model, **server_args)


def vllm_serve_command(model: str | VLLMServerArgs, **server_args: Any) -> list[str]:
    """The `vllm serve` command line for `model` (a Hub id or a local path, or the whole [`VLLMServerArgs`]);
    `server_args` are [`VLLMServerArgs`] fields, e.g. `port=9000`. Its `extra_args` are appended verbatim."""
    return _server_args(model, server_args).command()


def _find_vllm() -> str | None:
    found = shutil.which("vllm")
    if found:
        return found
    # a virtual environment's scripts are not on PATH unless it is activated
    sibling = Path(sys.executable).parent / "vllm"
    return str(sibling) if sibling.is_file() and os.access(sibling, os.X_OK) else None


def _require_vllm() -> str:
    """The `vllm` executable; an `ImportError` that says how to install it when there is none."""
    executable = _find_vllm()
    if executable is None:
        installed = importlib.util.find_spec("vllm") is not None
        detail = "the `vllm` package is importable but its `vllm` command is not on PATH" if installed else ""
        raise ImportError(
            "vLLM is needed to serve a model with start_vllm_server; install it with `pip install entropo-trl[vllm]` "
            "(or use serve_transformers for small models on CPU)" + (f"; {detail}" if detail else "")
        )
    return executable


def _launch(
    command: list[str], log_file: str | os.PathLike | None, env: dict[str, str] | None
) -> tuple[subprocess.Popen, Path]:
    """Start `command` in its own process group, its output appended to `log_file` (default: a new temporary
    file); the process and the log's path."""
    if log_file is None:
        handle, log_file = tempfile.mkstemp(prefix="vllm-", suffix=".log")
        os.close(handle)
    log_path = Path(log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    logger.info("started vLLM (pid %d), logging to %s: %s", process.pid, log_path, " ".join(command))
    return process, log_path


def start_vllm_server(
    model: str | VLLMServerArgs,
    *,
    log_file: str | os.PathLike | None = None,
    timeout: float = 1800.0,
    env: dict[str, str] | None = None,
    **server_args: Any,
) -> ServerHandle:
    """Start `vllm serve` in its own process group and wait until it is healthy.

    `model` is a Hub id or a local path, or the whole [`VLLMServerArgs`]; `server_args` are [`VLLMServerArgs`]
    fields (e.g. `tensor_parallel_size=4`). Output goes to `log_file` (default: a new temporary file, named in errors
    and in `handle.log_file`). `env` entries are added to the environment. Clients should use `handle.base_url` and
    `handle.model` (the served name: `served_model_name`, or `model`).

    Raises:
        ImportError: vLLM is not installed (no `vllm` executable).
        ServerStartError: the server exited or did not become healthy within `timeout` seconds (it is stopped).
    """
    args = _server_args(model, server_args)
    process, log_path = _launch(args.command(_require_vllm()), log_file, env)
    server = ServerHandle(
        args.base_url, model=args.served_model_name or args.model, process=process, log_file=log_path
    )
    try:
        wait_until_healthy(server.root_url, timeout, process, log_file=log_path)
    except BaseException:
        server.stop()
        raise
    return server
