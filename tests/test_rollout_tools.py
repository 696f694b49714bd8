"""The scaffold tools against a LocalSandbox (and the isolated BwrapSandbox) over a small temporary repository."""

import json
import os
import shutil
import sys
import time

import pytest

from entropo_trl.rollout.sandbox import BwrapSandbox, LocalSandbox
from entropo_trl.rollout.scaffold import Action, parse_action
from entropo_trl.rollout.tools import (
    CONCISE_MIN_LINES,
    MAX_LISTED_ENTRIES,
    MAX_OBSERVATION_CHARS,
    MAX_SEARCH_FILES,
    ToolResult,
    ToolState,
    clip,
    execute,
)

CORE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"


@pytest.fixture
def box(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("from .core import add\n")
    (repo / "pkg" / "core.py").write_text(CORE)
    (repo / "pkg" / "sub").mkdir()
    (repo / "pkg" / "sub" / "deep").mkdir()
    (repo / "pkg" / "sub" / "deep" / "hidden_by_depth.py").write_text("add\n")
    (repo / "README.md").write_text("Use add to add numbers.\n")
    (repo / ".secret").mkdir()
    (repo / ".secret" / "notes.txt").write_text("add\n")
    with LocalSandbox(repo, root=tmp_path) as sandbox:
        yield sandbox


@pytest.fixture
def state():
    return ToolState()


def call(box, state, name, timeout=90.0, **parameters) -> ToolResult:
    return execute(Action(name, {key: str(value) for key, value in parameters.items()}), box, state, timeout=timeout)


def edit(box, state, **parameters) -> str:
    return call(box, state, "file_editor", **parameters).observation


def path(box, relative):
    return os.path.join(box.workdir, relative)


# ------------------------------------------------------------------------------------------------------------ clip


def test_clip_keeps_head_and_tail_within_the_limit():
    assert clip("short") == "short"
    text = "H" * 8000 + "M" * 8000 + "T" * 8000
    clipped = clip(text)
    assert len(clipped) <= MAX_OBSERVATION_CHARS
    assert clipped.startswith("HHHH") and clipped.endswith("TTTT") and "<response clipped>" in clipped
    assert clip("x" * 50, limit=10) == "x" * 10


# ------------------------------------------------------------------------------------------------------------ view


def test_view_file_is_cat_n(box, state):
    observation = edit(box, state, command="view", path=path(box, "pkg/core.py"))
    assert observation.startswith(f"Here's the result of running `cat -n` on {path(box, 'pkg/core.py')}:\n")
    assert "     1\tdef add(a, b):\n     2\t    return a + b\n" in observation
    assert "     6\t    return a - b" in observation and "     7" not in observation


def test_view_relative_path_resolves_against_workdir(box, state):
    assert "     1\tdef add(a, b):" in edit(box, state, command="view", path="pkg/core.py")


def test_view_range(box, state):
    observation = edit(box, state, command="view", path=path(box, "pkg/core.py"), view_range="[2, 3]")
    assert "     2\t    return a + b\n     3\t\n" in observation and "     1\t" not in observation
    assert "     4\t" not in observation
    to_end = edit(box, state, command="view", path=path(box, "pkg/core.py"), view_range="[5, -1]")
    assert "     5\tdef sub(a, b):\n     6\t    return a - b" in to_end and "     4\t" not in to_end


@pytest.mark.parametrize(
    ("view_range", "message"),
    [("[0, 2]", "first line"), ("[7, 8]", "first line"), ("[4, 2]", "last line"), ("[1]", "two integers"),
     ("lines 1-2", "two integers"), ("[1.5, 2]", "two integers")],
)  # fmt: skip
def test_view_range_errors(box, state, view_range, message):
    observation = edit(box, state, command="view", path=path(box, "pkg/core.py"), view_range=view_range)
    assert observation.startswith("ERROR:") and message in observation


def test_view_directory_two_levels_without_hidden(box, state):
    observation = edit(box, state, command="view", path=box.workdir)
    assert "up to 2 levels deep" in observation
    lines = observation.splitlines()
    assert path(box, "pkg/core.py") in lines and path(box, "README.md") in lines
    assert path(box, "pkg/sub/") in lines
    assert not any("hidden_by_depth" in line or ".secret" in line or ".git" in line for line in lines)
    assert edit(box, state, command="view", path=box.workdir, view_range="[1, 2]").startswith("ERROR:")


def test_view_missing_path(box, state):
    observation = edit(box, state, command="view", path=path(box, "nope.py"))
    assert observation.startswith("ERROR:") and "does not exist" in observation


def test_concise_view_of_a_long_python_file(box, state):
    body = "".join(f"        x{i} = {i}\n" for i in range(CONCISE_MIN_LINES))
    source = (
        f"import os\n\n\nclass Big:\n    limit = 3\n\n    def method(self):\n{body}\n\ndef tail():\n    return 1\n"
    )
    box.write_file("big.py", source)
    observation = edit(box, state, command="view", path=path(box, "big.py"))
    assert "concise view" in observation and "view_range" in observation
    assert "     4\tclass Big:" in observation and "     5\t    limit = 3" in observation
    assert "     7\t    def method(self):" in observation
    assert "        ...  # lines 8-507 elided" in observation
    assert "   510\tdef tail():" in observation and "x42 = 42" not in observation
    full = edit(box, state, command="view", path=path(box, "big.py"), concise="false")
    assert "cat -n" in full and "<response clipped>" in full
    ranged = edit(box, state, command="view", path=path(box, "big.py"), view_range="[50, 51]")
    assert "    50\t        x42 = 42" in ranged
    short = edit(box, state, command="view", path=path(box, "pkg/core.py"), concise="true")
    assert "     1\tdef add(a, b):\n      \t    ...  # line 2 elided\n     3\t\n" in short
    assert edit(box, state, command="view", path=path(box, "pkg/core.py"), concise="maybe").startswith("ERROR:")


# ---------------------------------------------------------------------------------------------------------- create


def test_create_and_refuse_existing(box, state):
    target = path(box, "pkg/new/mod.py")
    assert "created successfully" in edit(box, state, command="create", path=target, file_text="X = 1\n")
    assert box.read_file(target) == "X = 1\n"
    refused = edit(box, state, command="create", path=target, file_text="X = 2\n")
    assert refused.startswith("ERROR:") and "already exists" in refused
    assert box.read_file(target) == "X = 1\n"
    assert edit(box, state, command="create", path=path(box, "pkg"), file_text="").startswith("ERROR:")
    assert "file_text" in edit(box, state, command="create", path=path(box, "other.py"))
    assert edit(box, state, command="undo_edit", path=target).startswith("ERROR:")


# ----------------------------------------------------------------------------------------------------- str_replace


def test_str_replace_success_snippet_and_undo(box, state):
    target = path(box, "pkg/core.py")
    observation = edit(box, state, command="str_replace", path=target, old_str="a - b", new_str="a - b - 0")
    assert "has been edited" in observation and "     6\t    return a - b - 0" in observation
    assert "     2\t    return a + b" in observation  # context around the edit
    assert box.read_file(target) == CORE.replace("a - b", "a - b - 0")
    assert state.history[target] == [CORE]
    undone = edit(box, state, command="undo_edit", path=target)
    assert "undone successfully" in undone and box.read_file(target) == CORE
    assert "No edit history" in edit(box, state, command="undo_edit", path=target)


def test_str_replace_not_found_and_not_unique(box, state):
    target = path(box, "pkg/core.py")
    missing = edit(box, state, command="str_replace", path=target, old_str="a * b", new_str="")
    assert missing.startswith("ERROR:") and "did not appear verbatim" in missing
    several = edit(box, state, command="str_replace", path=target, old_str="(a, b):", new_str="(x, y):")
    assert several.startswith("ERROR:") and "[1, 5]" in several
    assert box.read_file(target) == CORE and target not in state.history
    assert edit(box, state, command="str_replace", path=target, old_str="", new_str="x").startswith("ERROR:")
    assert "old_str" in edit(box, state, command="str_replace", path=target, new_str="x")


def test_str_replace_without_new_str_deletes(box, state):
    target = path(box, "pkg/core.py")
    edit(box, state, command="str_replace", path=target, old_str="\n\ndef sub(a, b):\n    return a - b\n")
    assert box.read_file(target) == "def add(a, b):\n    return a + b\n"


# ---------------------------------------------------------------------------------------------------------- insert


def test_insert_top_middle_end_and_errors(box, state):
    target = path(box, "pkg/core.py")
    observation = edit(box, state, command="insert", path=target, insert_line="0", new_str="import math")
    assert "     1\timport math\n     2\tdef add(a, b):" in observation
    edit(box, state, command="insert", path=target, insert_line="3", new_str="# after add")
    edit(box, state, command="insert", path=target, insert_line="8", new_str="# end\n")
    assert box.read_file(target).splitlines() == [
        "import math", "def add(a, b):", "    return a + b", "# after add", "", "", "def sub(a, b):",
        "    return a - b", "# end",
    ]  # fmt: skip
    for bad in ("-1", "10", "two"):
        observation = edit(box, state, command="insert", path=target, insert_line=bad, new_str="x")
        assert observation.startswith("ERROR:") and "insert_line" in observation
    assert "new_str" in edit(box, state, command="insert", path=target, insert_line="1")
    assert len(state.history[target]) == 3
    for _ in range(3):
        edit(box, state, command="undo_edit", path=target)
    assert box.read_file(target) == CORE


def test_insert_after_last_line_without_newline(box, state):
    box.write_file("plain.txt", "one\ntwo")
    edit(box, state, command="insert", path=path(box, "plain.txt"), insert_line="2", new_str="three")
    assert box.read_file("plain.txt") == "one\ntwo\nthree\n"


# ------------------------------------------------------------------------------------------------- editor errors


@pytest.mark.parametrize(
    ("parameters", "message"),
    [({}, "`command` is required"), ({"command": "view"}, "`path` is required"),
     ({"command": "delete", "path": "/x"}, "Unknown file_editor command"),
     ({"command": "str_replace", "path": "pkg", "old_str": "a"}, "directory")],
)  # fmt: skip
def test_editor_bad_parameters_are_observations(box, state, parameters, message):
    result = execute(Action("file_editor", parameters), box, state)
    assert not result.done and result.observation.startswith("ERROR:") and message in result.observation


def test_binary_file_is_an_error_observation(box, state):
    (open(path(box, "blob.bin"), "wb")).write(b"\xff\xfe\x00")
    observation = edit(box, state, command="view", path=path(box, "blob.bin"))
    assert observation.startswith("ERROR:") and "UTF-8" in observation


# ---------------------------------------------------------------------------------------------------- execute_bash


def test_execute_bash_output_and_exit_code(box, state):
    observation = call(box, state, "execute_bash", cmd="echo hello; echo oops >&2; exit 2").observation
    assert observation.startswith("Exit code: 2\nExecution output of [execute_bash]:\n[STDOUT]\n\nhello\n")
    assert "[STDERR]\n\noops" in observation
    assert call(box, state, "execute_bash", cmd="pwd").observation.count(box.workdir) == 1


def test_execute_bash_timeout_and_empty_command(box, state):
    observation = call(box, state, "execute_bash", timeout=0.5, cmd="echo partial; sleep 30").observation
    assert "killed after 0.5 seconds" in observation and "partial" in observation
    for empty in ("", "   "):
        assert call(box, state, "execute_bash", cmd=empty).observation.startswith("ERROR:")
    assert "`cmd` is required" in execute(Action("execute_bash", {}), box, state).observation


def test_execute_bash_long_output_is_clipped(box, state):
    observation = call(box, state, "execute_bash", cmd="seq 1 100000; echo failure >&2").observation
    assert len(observation) <= MAX_OBSERVATION_CHARS
    assert "<response clipped>" in observation
    assert "\n1\n2\n3\n" in observation and "100000" in observation and "failure" in observation


def test_execute_bash_keeps_the_real_end_of_a_huge_output(box, state):
    """Past the sandbox's own cap (1M characters) the head and the tail are kept, so the end of a long test run (its
    summary) still reaches the model."""
    observation = call(box, state, "execute_bash", cmd="seq 1 400000; echo THE_REAL_END").observation
    stdout = observation.split("[STDERR]")[0]
    assert len(observation) <= MAX_OBSERVATION_CHARS and stdout.rstrip().endswith("400000\nTHE_REAL_END")
    assert "\n1\n2\n3\n" in observation


def test_bad_input_becomes_an_error_observation(box, state):
    assert call(box, state, "execute_bash", cmd="echo a\x00b").observation.startswith("ERROR:")  # NUL byte
    created = edit(box, state, command="create", path=path(box, "s.txt"), file_text="lone \ud800 surrogate")
    assert created.startswith("ERROR:")
    huge = edit(box, state, command="view", path=path(box, "pkg/core.py"), view_range="[1, " + "9" * 5000 + "]")
    assert huge.startswith("ERROR:")


def test_commands_use_the_running_python(box, state):
    observation = call(box, state, "execute_bash", cmd="command -v python").observation
    assert os.path.dirname(sys.executable) + "/python" in observation


# ---------------------------------------------------------------------------------------------------------- search


def test_search_directory(box, state):
    observation = call(box, state, "search", search_term="add").observation
    lines = observation.splitlines()
    assert lines[0] == f'Found 4 matches for "add" in {box.workdir}:'
    assert lines[1:5] == [
        "./README.md (1 matches)", "./pkg/__init__.py (1 matches)", "./pkg/core.py (1 matches)",
        "./pkg/sub/deep/hidden_by_depth.py (1 matches)",
    ]  # fmt: skip
    assert ".secret" not in observation and ".git" not in observation
    scoped = call(box, state, "search", search_term="def ", path=path(box, "pkg")).observation
    assert scoped.splitlines()[1:] == ["./core.py (2 matches)", f'End of matches for "def " in {path(box, "pkg")}']


def test_search_file_no_match_and_errors(box, state):
    observation = call(box, state, "search", search_term="return", path=path(box, "pkg/core.py")).observation
    assert observation.splitlines()[1:] == ["2:    return a + b", "6:    return a - b"]
    assert "No matches found" in call(box, state, "search", search_term="zzz_nothing").observation
    assert "No matches found" in call(box, state, "search", search_term="zzz", path="pkg/core.py").observation
    assert call(box, state, "search", search_term="x", path="missing/").observation.startswith("ERROR:")
    assert "`search_term` is required" in execute(Action("search", {}), box, state).observation
    literal = call(box, state, "search", search_term="a + b", path="pkg").observation  # not a regex
    assert "./core.py (1 matches)" in literal


def test_search_more_than_100_files_is_truncated(box, state):
    box.run(f"mkdir many && for i in $(seq 1 {MAX_SEARCH_FILES + 5}); do echo needle > many/f$i.txt; done")
    observation = call(box, state, "search", search_term="needle", path="many").observation
    assert "Please narrow your search" in observation
    assert observation.count("(1 matches)") == MAX_SEARCH_FILES


# ---------------------------------------------------------------------------------------------- finish and errors


def test_finish_and_submit(box, state):
    result = execute(parse_action("<function=finish>\n<parameter=command>submit</parameter>\n"
                                  "<parameter=result>fixed it</parameter>\n</function>"), box, state)  # fmt: skip
    assert result == ToolResult("<<< Finished >>>", done=True, result="fixed it")
    assert execute(Action("submit", {}), box, state).done
    assert execute(parse_action("<function=submit>\n</function>"), box, state).result == ""


def test_parse_errors_and_unknown_tools_are_observations(box, state):
    parsed = parse_action("I think I am done.")
    result = execute(parsed, box, state)
    assert not result.done and result.observation == parsed.error
    unknown = execute(Action("browser", {"url": "x"}), box, state)
    assert not unknown.done and unknown.observation.startswith("ERROR:") and "Unknown function" in unknown.observation
    assert execute(Action(None, {}), box, state).observation.startswith("ERROR:")


def test_every_observation_is_clipped(box, state):
    box.write_file("huge.txt", "line\n" * 10_000)
    observation = edit(box, state, command="view", path=path(box, "huge.txt"))
    assert len(observation) <= MAX_OBSERVATION_CHARS and "<response clipped>" in observation
    box.write_file("wide.py", json.dumps(["x" * 20_000]) + "\n")
    missing = edit(box, state, command="str_replace", path=path(box, "wide.py"), old_str="y" * 20_000, new_str="")
    assert len(missing) <= MAX_OBSERVATION_CHARS and "<response clipped>" in missing


# ------------------------------------------------------------------------------------------------ isolated sandbox


@pytest.fixture
def isolated(tmp_path):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    repo = tmp_path / "isolated_repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "core.py").write_text(CORE)
    with BwrapSandbox(repo, root=tmp_path / "boxes") as sandbox:
        yield sandbox


def test_isolated_file_tools_work_at_testbed(isolated, state):
    assert "     1\tdef add(a, b):" in edit(isolated, state, command="view", path="/testbed/pkg/core.py")
    edit(isolated, state, command="str_replace", path="pkg/core.py", old_str="a + b", new_str="b + a")
    assert "return b + a" in isolated.read_file("pkg/core.py")
    assert "/testbed/pkg/core.py" in edit(isolated, state, command="view", path="/testbed")
    assert "core.py (1 matches)" in call(isolated, state, "search", search_term="b + a").observation
    assert "undone" in edit(isolated, state, command="undo_edit", path="pkg/core.py")


def test_isolated_file_tools_never_write_on_the_host(isolated, state):
    token = os.urandom(6).hex()
    created = edit(isolated, state, command="create", path=f"/tmp/escape-{token}", file_text="x")
    assert "created" in created and not os.path.exists(f"/tmp/escape-{token}")  # the sandbox's private /tmp
    for target in (f"/testbed/../escape-{token}", f"/etc/escape-{token}", "/etc/passwd"):
        observation = edit(isolated, state, command="create", path=target, file_text="x")
        assert observation.startswith("ERROR:"), observation
    assert not os.path.exists(f"/escape-{token}") and not os.path.exists(f"/etc/escape-{token}")
    observation = edit(
        isolated, state, command="str_replace", path="/etc/passwd", old_str="root:x:0:0:", new_str="toor:x:0:0:"
    )
    assert observation.startswith("ERROR:") and "Read-only" in observation


@pytest.mark.parametrize("sandbox_kind", ["host", "isolated"])
def test_special_files_are_refused_within_the_tool_limit(sandbox_kind, box, state, request):
    sandbox = box if sandbox_kind == "host" else request.getfixturevalue("isolated")
    sandbox.run("mkfifo fifo && ln -s /dev/zero zero")
    for target in ("fifo", "/dev/zero", "zero"):
        start = time.monotonic()
        observation = edit(sandbox, state, command="view", path=target)
        assert observation.startswith("ERROR:") and "not a regular file" in observation, observation
        replaced = edit(sandbox, state, command="str_replace", path=target, old_str="a", new_str="b")
        assert "not a regular file" in replaced
        searched = call(sandbox, state, "search", search_term="x", path=target, timeout=3).observation
        assert searched.startswith("ERROR:") and "not a regular file" in searched
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("sandbox_kind", ["host", "isolated"])
def test_directory_listing_is_bounded(sandbox_kind, box, state, request):
    sandbox = box if sandbox_kind == "host" else request.getfixturevalue("isolated")
    sandbox.run(f"mkdir many && cd many && touch $(seq 1 {MAX_LISTED_ENTRIES + 10})")
    observation = edit(sandbox, state, command="view", path="many")
    assert f"more than {MAX_LISTED_ENTRIES} entries" in observation
    # the cut is real, not only announced (the observation itself is clipped further, at 10,000 characters)
    assert len(sandbox.list_dir("many", limit=MAX_LISTED_ENTRIES)) == MAX_LISTED_ENTRIES
