"""The four scaffold tools (`file_editor`, `execute_bash`, `search`, `finish`) run against a [`Sandbox`].

[`execute`] takes a parsed [`Action`] and returns the observation the model sees next. It never raises on bad
input: missing or malformed parameters, missing files and failed edits become an observation starting with
`ERROR:`. Only failures of the sandbox itself ([`SandboxError`]) propagate. Every observation is clipped to
[`MAX_OBSERVATION_CHARS`] with a `<response clipped>` marker.

Every tool works through the sandbox, so its paths are the sandbox's (in the isolated sandbox, `/tmp/x` is its
private /tmp and `/etc/passwd` is read-only), and every sandbox operation of a tool call gets the tool time limit.
FIFOs, devices and sockets are refused with an observation saying so; reads (`sandbox.MAX_READ_BYTES`) and directory
listings ([`MAX_LISTED_ENTRIES`]) are bounded.
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from ..actions import FINISH_NAMES, Action
from .sandbox import Sandbox

MAX_OBSERVATION_CHARS = 10_000
# Python files longer than this are shown as a skeleton unless `concise=false` or a `view_range` is given.
CONCISE_MIN_LINES = 500
# Lines of context shown around an edit.
SNIPPET_LINES = 4
MAX_SEARCH_FILES = 100
# Entries a directory `view` lists.
MAX_LISTED_ENTRIES = 1000
FINISHED = "<<< Finished >>>"
EDITOR_COMMANDS = ("view", "create", "str_replace", "insert", "undo_edit")


class ToolError(ValueError):
    """Bad input from the model; its message becomes the observation."""


@dataclass
class ToolState:
    """What the tools remember during one episode: the contents of each file before each edit, for `undo_edit`."""

    history: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ToolResult:
    """The observation for the model. `done` is set by `finish`, whose `result` parameter lands in `result`."""

    observation: str
    done: bool = False
    result: str = ""


def clip(text: str, limit: int = MAX_OBSERVATION_CHARS) -> str:
    """`text` if it fits in `limit` characters, else its head and tail around a `<response clipped>` note; the
    result is at most `limit` characters long."""
    if len(text) <= limit:
        return text
    note = (
        f"\n<response clipped><NOTE>{{}} characters were clipped: observations are limited to {limit} characters. "
        "Use a command with less output (grep, head, tail, a view_range, or redirect to a file).</NOTE>\n"
    )
    budget = limit - len(note.format(len(text)))
    if budget <= 0:
        return text[:limit]
    head = budget // 2
    tail = budget - head
    return text[:head] + note.format(len(text) - budget) + text[len(text) - tail :]


def execute(action: Action, sandbox: Sandbox, state: ToolState, timeout: float = 90.0) -> ToolResult:
    """Run one action in the sandbox and return what the model should see."""
    if action.error:
        return ToolResult(clip(action.error))
    try:
        if action.name in FINISH_NAMES:
            return ToolResult(FINISHED, done=True, result=action.parameters.get("result", ""))
        handler = _TOOLS.get(action.name or "")
        if handler is None:
            raise ToolError(f"Unknown function {action.name!r}. Available functions: {', '.join(_TOOLS)}, finish.")
        observation = handler(action.parameters, sandbox, state, timeout)
    except ToolError as error:
        observation = f"ERROR: {error}"
    except UnicodeDecodeError as error:
        observation = f"ERROR: the file is not UTF-8 text ({error.reason}); use execute_bash to inspect it."
    except (ValueError, UnicodeError) as error:  # e.g. a NUL byte in a command, an unencodable character
        observation = f"ERROR: {error}"
    except OSError as error:
        observation = f"ERROR: {error}"
    return ToolResult(clip(observation))


# ------------------------------------------------------------------------------------------------------ helpers


def _required(parameters: dict[str, str], name: str, command: str) -> str:
    value = parameters.get(name)
    if value is None:
        raise ToolError(f"Parameter `{name}` is required for {command}.")
    return value


def _number(lines: list[str], first: int) -> str:
    """Lines in `cat -n` style, the first numbered `first`."""
    return "\n".join(f"{number:6}\t{line}" for number, line in enumerate(lines, start=first))


def _lines(content: str) -> list[str]:
    """The file's lines split at "\\n" only, as `cat -n` and `grep -n` count them, without their line ends (a final
    newline does not start an extra empty line)."""
    return [line.removesuffix("\n").removesuffix("\r") for line in _lines_keepends(content)]


def _lines_keepends(content: str) -> list[str]:
    lines = [line + "\n" for line in content.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _parse_bool(value: str | None, name: str) -> bool | None:
    if value is None or not value.strip():
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ToolError(f"`{name}` must be true or false, got {value!r}.")


def _parse_int(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ToolError(f"`{name}` must be an integer, got {value!r}.") from None


# -------------------------------------------------------------------------------------------------- file_editor


def _file_editor(parameters: dict[str, str], sandbox: Sandbox, state: ToolState, timeout: float) -> str:
    command = _required(parameters, "command", "file_editor").strip()
    if command not in EDITOR_COMMANDS:
        raise ToolError(f"Unknown file_editor command {command!r}. Allowed commands: {', '.join(EDITOR_COMMANDS)}.")
    path = _required(parameters, "path", f"file_editor {command}").strip()
    if not path:
        raise ToolError("Parameter `path` must not be empty.")
    path = sandbox.resolve(path)
    if command == "create":
        return _create(sandbox, path, _required(parameters, "file_text", "file_editor create"), timeout)
    if not sandbox.exists(path, timeout=timeout):
        raise ToolError(f"The path {path} does not exist. Please provide a valid path.")
    if command == "view":
        view_range, concise = parameters.get("view_range"), _parse_bool(parameters.get("concise"), "concise")
        return _view(sandbox, path, view_range, concise, timeout)
    if sandbox.is_dir(path, timeout=timeout):
        raise ToolError(f"The path {path} is a directory; only the `view` command can be used on directories.")
    if command == "str_replace":
        old_str = _required(parameters, "old_str", "file_editor str_replace")
        return _str_replace(sandbox, state, path, old_str, parameters.get("new_str", ""), timeout)
    if command == "insert":
        line = _parse_int(_required(parameters, "insert_line", "file_editor insert"), "insert_line")
        return _insert(sandbox, state, path, line, _required(parameters, "new_str", "file_editor insert"), timeout)
    return _undo(sandbox, state, path, timeout)


def _view(sandbox: Sandbox, path: str, view_range: str | None, concise: bool | None, timeout: float) -> str:
    if sandbox.is_dir(path, timeout=timeout):
        if view_range:
            raise ToolError("`view_range` cannot be used when `path` is a directory.")
        entries = sandbox.list_dir(path, depth=2, limit=MAX_LISTED_ENTRIES + 1, timeout=timeout)
        more = len(entries) > MAX_LISTED_ENTRIES
        listing = "\n".join([path, *(posixpath.join(path, entry) for entry in entries[:MAX_LISTED_ENTRIES])])
        note = f"\n[more than {MAX_LISTED_ENTRIES} entries: listing cut; view a subdirectory]" if more else ""
        return f"Here's the files and directories up to 2 levels deep in {path}, excluding hidden:\n{listing}{note}\n"
    content = sandbox.read_file(path, timeout=timeout)
    lines = _lines(content)
    if view_range is not None and view_range.strip():
        start, end = _parse_view_range(view_range, len(lines))
        return f"Here's the result of running `cat -n` on {path}:\n{_number(lines[start - 1 : end], start)}\n"
    if concise is None:
        concise = path.endswith(".py") and len(lines) > CONCISE_MIN_LINES
    if concise and path.endswith(".py"):
        skeleton = _skeleton(content, lines)
        if skeleton is not None:
            return (
                f"Here is a concise view of {path}: function bodies are elided (marked ...). To see "
                "the full content of some lines, use view with a view_range, e.g. [100, 150], and concise=false.\n"
                f"{skeleton}\n"
            )
    if not lines:
        return f"The file {path} is empty."
    return f"Here's the result of running `cat -n` on {path}:\n{_number(lines, 1)}\n"


def _parse_view_range(text: str, n_lines: int) -> tuple[int, int]:
    """`[start, end]` (1-based, inclusive; end -1 for the end of the file) as a checked pair."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not (isinstance(value, list) and len(value) == 2 and all(type(item) is int for item in value)):
        raise ToolError(f"`view_range` must be a list of two integers like [11, 12], got {text.strip()!r}.")
    start, end = value
    if not 1 <= start <= max(n_lines, 1):
        raise ToolError(f"Invalid view_range {value}: the first line {start} must be within [1, {n_lines}].")
    if end == -1:
        return start, n_lines
    if end < start:
        raise ToolError(f"Invalid view_range {value}: the last line {end} must be >= the first line {start} (or -1).")
    return start, min(end, n_lines)


def _skeleton(content: str, lines: list[str]) -> str | None:
    """The file with function bodies elided, in `cat -n` style; None when it is not valid Python."""
    try:
        tree = ast.parse(content)
    except (SyntaxError, ValueError):
        return None
    elided: dict[int, int] = {}  # first elided line -> last elided line
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first, last = node.body[0].lineno, node.end_lineno or node.body[-1].lineno
            if first > node.lineno and not any(a <= first <= b for a, b in elided.items()):
                elided[first] = last
    out: list[str] = []
    number = 1
    while number <= len(lines):
        if number in elided:
            last = elided[number]
            indent = re.match(r"\s*", lines[number - 1]).group(0)
            span = f"line {number}" if last == number else f"lines {number}-{last}"
            out.append(f"{'':6}\t{indent}...  # {span} elided")
            number = last + 1
        else:
            out.append(f"{number:6}\t{lines[number - 1]}")
            number += 1
    return "\n".join(out)


def _create(sandbox: Sandbox, path: str, file_text: str, timeout: float) -> str:
    if sandbox.exists(path, timeout=timeout):
        kind = "directory" if sandbox.is_dir(path, timeout=timeout) else "file"
        raise ToolError(f"A {kind} already exists at {path}. Cannot overwrite it with `create`; edit it instead.")
    sandbox.write_file(path, file_text, timeout=timeout)
    return f"File created successfully at {path}."


def _snippet(content: str, first: int, last: int) -> str:
    """Lines `first`..`last` of `content` with SNIPPET_LINES of context each side, numbered."""
    lines = _lines(content)
    start = max(1, first - SNIPPET_LINES)
    end = min(len(lines), last + SNIPPET_LINES)
    return _number(lines[start - 1 : end], start)


def _edited(path: str, content: str, first: int, last: int) -> str:
    return (
        f"The file {path} has been edited. Here's the result of running `cat -n` on a snippet of {path}:\n"
        f"{_snippet(content, first, last)}\nReview the changes and make sure they are as expected. Edit the file "
        "again if necessary."
    )


def _str_replace(sandbox: Sandbox, state: ToolState, path: str, old_str: str, new_str: str, timeout: float) -> str:
    if not old_str:
        raise ToolError("`old_str` must not be empty; use `insert` or `create` to add text.")
    content = sandbox.read_file(path, timeout=timeout)
    starts = [match.start() for match in re.finditer(re.escape(old_str), content)]
    if not starts:
        raise ToolError(f"No replacement was performed: old_str did not appear verbatim in {path}.\n{old_str}")
    if len(starts) > 1:
        line_numbers = [content.count("\n", 0, start) + 1 for start in starts]
        raise ToolError(
            f"No replacement was performed: old_str occurs {len(starts)} times in {path}, in lines {line_numbers}. "
            "Include more surrounding lines in old_str to make it unique."
        )
    new_content = content[: starts[0]] + new_str + content[starts[0] + len(old_str) :]
    sandbox.write_file(path, new_content, timeout=timeout)
    state.history.setdefault(path, []).append(content)
    first = content.count("\n", 0, starts[0]) + 1
    return _edited(path, new_content, first, first + new_str.count("\n"))


def _insert(sandbox: Sandbox, state: ToolState, path: str, insert_line: int, new_str: str, timeout: float) -> str:
    content = sandbox.read_file(path, timeout=timeout)
    lines = _lines_keepends(content)
    if not 0 <= insert_line <= len(lines):
        raise ToolError(f"Invalid insert_line {insert_line}: it must be within [0, {len(lines)}] for {path}.")
    if lines and insert_line == len(lines) and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    text = new_str if new_str.endswith("\n") else new_str + "\n"
    new_content = "".join(lines[:insert_line]) + text + "".join(lines[insert_line:])
    sandbox.write_file(path, new_content, timeout=timeout)
    state.history.setdefault(path, []).append(content)
    return _edited(path, new_content, insert_line + 1, insert_line + max(1, len(_lines(text))))


def _undo(sandbox: Sandbox, state: ToolState, path: str, timeout: float) -> str:
    history = state.history.get(path)
    if not history:
        raise ToolError(f"No edit history found for {path}.")
    previous = history.pop()
    sandbox.write_file(path, previous, timeout=timeout)
    shown = _number(_lines(previous), 1)
    return f"Last edit to {path} undone successfully. Here's the result of running `cat -n` on {path}:\n{shown}\n"


# ------------------------------------------------------------------------------------------------- execute_bash


def _execute_bash(parameters: dict[str, str], sandbox: Sandbox, state: ToolState, timeout: float) -> str:
    command = parameters.get("cmd", parameters.get("command"))
    if command is None or not command.strip():
        raise ToolError("Parameter `cmd` is required for execute_bash and must not be empty.")
    result = sandbox.run(command, timeout=timeout)
    half = MAX_OBSERVATION_CHARS // 2
    output = (
        f"Execution output of [execute_bash]:\n[STDOUT]\n\n{clip(result.stdout, half)}\n"
        f"[STDERR]\n\n{clip(result.stderr, half)}"
    )
    if result.timed_out:
        return (
            f"The command was killed after {timeout:g} seconds (time limit). For long-running commands, run them in "
            f"the background with output redirected to a file, or narrow them down.\n{output}"
        )
    return f"Exit code: {result.exit_code}\n{output}"


# ------------------------------------------------------------------------------------------------------- search


def _search(parameters: dict[str, str], sandbox: Sandbox, state: ToolState, timeout: float) -> str:
    term = parameters.get("search_term")
    if term is None or not term:
        raise ToolError("Parameter `search_term` is required for search and must not be empty.")
    if "\n" in term:
        raise ToolError("`search_term` must be a single line.")
    path = sandbox.resolve((parameters.get("path") or ".").strip() or ".")
    if not sandbox.exists(path, timeout=timeout):
        raise ToolError(f"The path {path} does not exist.")
    if sandbox.is_dir(path, timeout=timeout):
        return _search_directory(sandbox, term, path, timeout)
    return _search_file(sandbox, term, path, timeout)


def _search_directory(sandbox: Sandbox, term: str, directory: str, timeout: float) -> str:
    # `find` rather than `grep -r --exclude-dir='.*'`, which would also skip a starting directory named `.`.
    command = (
        f"find {shlex.quote(directory)} -mindepth 1 -name '.*' -prune -o -type f -print0 | "
        f"xargs -0 -r grep -D skip -IHcZ -F -e {shlex.quote(term)} --"
    )
    result = sandbox.run(command, timeout=timeout, max_output=50_000_000)
    if result.timed_out:
        raise ToolError(f"The search for {term!r} in {directory} took more than {timeout:g} seconds; narrow it down.")
    counts: dict[str, int] = {}
    for line in result.stdout.splitlines():
        name, _, count = line.rpartition("\0")
        if name and count.strip().isdigit() and int(count) > 0:
            counts["./" + posixpath.relpath(name, directory)] = int(count)
    if not counts:
        return f'No matches found for "{term}" in {directory}'
    files = sorted(counts)
    total = sum(counts.values())
    lines = [f'Found {total} matches for "{term}" in {directory}:']
    lines += [f"{name} ({counts[name]} matches)" for name in files[:MAX_SEARCH_FILES]]
    if len(files) > MAX_SEARCH_FILES:
        lines.append(
            f"More than {MAX_SEARCH_FILES} files matched ({len(files)}); only the first {MAX_SEARCH_FILES} are "
            "listed. Please narrow your search."
        )
    lines.append(f'End of matches for "{term}" in {directory}')
    return "\n".join(lines)


def _search_file(sandbox: Sandbox, term: str, path: str, timeout: float) -> str:
    quoted = shlex.quote(path)
    command = (
        f"test -f {quoted} || {{ stat -L -c %F -- {quoted}; exit 3; }}; grep -n -F -e {shlex.quote(term)} -- {quoted}"
    )
    result = sandbox.run(command, timeout=timeout)
    if result.exit_code == 3:
        kind = result.stdout.strip() or "special file"
        raise ToolError(f"{path} is a {kind}, not a regular file: search reads regular files only.")
    if result.exit_code == 1 and not result.stdout:
        return f'No matches found for "{term}" in {path}'
    if not result.ok:
        raise ToolError(f"grep failed on {path}: {result.stderr.strip() or 'timed out'}")
    return f'Matches for "{term}" in {path}:\n{result.stdout.rstrip()}'


_TOOLS = {"file_editor": _file_editor, "execute_bash": _execute_bash, "search": _search}
