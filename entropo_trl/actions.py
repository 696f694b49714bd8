"""The agent's call format, parsed in this one place (R2E-Gym's text format).

The model answers with a thought and one call in text form::

    I will look at the failing test first.
    <function=execute_bash>
    <parameter=cmd>pytest -x tests/test_parse.py</parameter>
    </function>

The first call in a response is the action (the one the runner executes); the text before it is the thought. A
response without a call, or with a malformed one, is not an error: [`parse_action`] returns an [`Action`] whose
`error` says what is wrong, and the runner sends that back as the observation.

Recorded trajectories are read with the same rule by [`message_action`]: the first call of an assistant turn is its
action, whatever tools the recording scaffold had (SWE-agent's `bash`, `str_replace_editor`...), and a turn finishes
the episode only when that first call is `finish` / `submit`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

# The tools of the R2E scaffold (its system prompt is `rollout.scaffold.SYSTEM_PROMPT`).
TOOL_NAMES = ("file_editor", "execute_bash", "search", "finish")
FINISH_NAMES = ("finish", "submit")

_NO_CALL = (
    "No function call found. Reply with your reasoning followed by exactly one call in the format "
    "<function=NAME>\n<parameter=KEY>VALUE</parameter>\n</function>."
)
_FUNCTION = re.compile(r"<function\s*=\s*([^>\n]*)>")
_FUNCTION_END = re.compile(r"</function\s*>")
_PARAMETER = re.compile(r"<parameter\s*=\s*([^>\n]*)>(.*?)</parameter\s*>", re.DOTALL)


@dataclass
class Action:
    """One parsed model response. `name` is None when the response holds no valid call (`error` says why)."""

    name: str | None
    parameters: dict[str, str] = field(default_factory=dict)
    thought: str = ""
    error: str | None = None

    @property
    def is_finish(self) -> bool:
        return self.name in FINISH_NAMES

    def to_text(self) -> str:
        """The call in the scaffold's text format (what a scripted policy sends)."""
        lines = [f"<function={self.name}>"]
        lines += [f"<parameter={key}>{value}</parameter>" for key, value in self.parameters.items()]
        lines.append("</function>")
        return (self.thought + "\n" if self.thought else "") + "\n".join(lines)


def parse_action(text: str, tool_names: Collection[str] | None = TOOL_NAMES) -> Action:
    """Parse the first `<function=NAME>...</function>` call of a response. Never raises: a missing or malformed call
    gives an `Action` with `name=None` and an `error` to show the model.

    Args:
        text: the model's response.
        tool_names: the functions a call may name (besides `finish` / `submit`); `None` accepts any name (for
            trajectories recorded with another scaffold's tools).
    """
    if not isinstance(text, str):
        return Action(None, error=f"the response is not text ({type(text).__name__})")
    action = _first_call(text, tool_names)
    return action if action is not None else Action(None, thought=text.strip(), error=_NO_CALL)


def message_action(message: Mapping[str, Any]) -> Action:
    """The action of a recorded assistant message: the first call of its text (any function name), or, when the text
    holds no call, its first structured `tool_calls` entry (OpenAI function calling)."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    action = _first_call(text, tool_names=None)
    if action is None:
        action = _first_tool_call(message.get("tool_calls"), thought=text.strip())
    return action if action is not None else Action(None, thought=text.strip(), error=_NO_CALL)


def _canonical(name: str) -> str:
    """`submit` is R2E-Gym's other name for `finish`."""
    return "finish" if name == "submit" else name


def _first_call(text: str, tool_names: Collection[str] | None) -> Action | None:
    """The first text call of `text` (None when there is none), checked against `tool_names`."""
    start = _FUNCTION.search(text)
    if start is None:
        return None
    thought = text[: start.start()].strip()
    name = start.group(1).strip()
    end = _FUNCTION_END.search(text, start.end())
    if end is None:
        return Action(None, thought=thought, error=f"The call to {name!r} is missing its closing </function> tag.")
    if not name:
        return Action(None, thought=thought, error="The function call has no name: use <function=NAME>.")
    if tool_names is not None and name not in tool_names and name not in FINISH_NAMES:
        return Action(
            None, thought=thought, error=f"Unknown function {name!r}. Available functions: {', '.join(tool_names)}."
        )
    return Action(_canonical(name), _parameters(text[start.end() : end.start()]), thought)


def _parameters(body: str) -> dict[str, str]:
    """The `<parameter=KEY>VALUE</parameter>` pairs of a call's body (the first of a repeated key wins); one newline
    just inside each tag is part of the layout, not of the value."""
    parameters: dict[str, str] = {}
    for match in _PARAMETER.finditer(body):
        key, value = match.group(1).strip(), match.group(2)
        if value.startswith("\n"):
            value = value[1:]
        if value.endswith("\n"):
            value = value[:-1]
        parameters.setdefault(key, value)
    return parameters


def _first_tool_call(tool_calls: Any, thought: str) -> Action | None:
    """The first named entry of structured `tool_calls` (None when there is none); JSON-encoded arguments are decoded,
    and non-string argument values kept as JSON text (as a text call would carry them)."""
    for call in tool_calls or []:
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        name = function.get("name")
        if not name:
            continue
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        if not isinstance(arguments, dict):
            arguments = {}
        parameters = {
            str(key): value if isinstance(value, str) else json.dumps(value) for key, value in arguments.items()
        }
        return Action(_canonical(str(name)), parameters, thought)
    return None
