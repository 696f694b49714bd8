"""The rollout engine: the R2E scaffold and its four tools, sandboxes, an OpenAI-compatible client, the runner (with
its trajectory pool's bookkeeping and the redaction of secrets) and the test oracle (docs/design.md, 'Rollouts')."""

from .client import ChatClient, Completion, ContextLimitExceeded, LLMError, SamplingParams
from .oracle import OracleResult, evaluate_patch
from .runner import RolloutConfig, RolloutSummary, default_sandbox_factory, run_episode, run_rollouts
from .sandbox import (
    SANDBOX_BACKENDS,
    BwrapSandbox,
    CommandResult,
    DockerSandbox,
    LocalSandbox,
    Sandbox,
    SandboxError,
    make_sandbox,
    require_bwrap,
)
from .scaffold import SYSTEM_PROMPT, Action, parse_action
from .tasks import Task, load_local_tasks, load_swebench_tasks, load_tasks
from .tools import ToolResult, ToolState, execute
from .toy import make_toy_tasks

__all__ = [
    "SANDBOX_BACKENDS",
    "SYSTEM_PROMPT",
    "Action",
    "BwrapSandbox",
    "ChatClient",
    "CommandResult",
    "Completion",
    "ContextLimitExceeded",
    "DockerSandbox",
    "LLMError",
    "LocalSandbox",
    "OracleResult",
    "RolloutConfig",
    "RolloutSummary",
    "Sandbox",
    "SandboxError",
    "SamplingParams",
    "Task",
    "ToolResult",
    "ToolState",
    "default_sandbox_factory",
    "evaluate_patch",
    "execute",
    "load_local_tasks",
    "load_swebench_tasks",
    "load_tasks",
    "make_sandbox",
    "make_toy_tasks",
    "parse_action",
    "require_bwrap",
    "run_episode",
    "run_rollouts",
]
