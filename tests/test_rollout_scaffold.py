from hypothesis import given, settings
from hypothesis import strategies as st

from entropo_trl.rollout.scaffold import (
    SYSTEM_PROMPT,
    TOOL_NAMES,
    Action,
    instance_prompt,
    parse_action,
    with_steps_remaining,
)


def test_first_call_is_the_action_and_text_before_it_the_thought():
    text = (
        "I will list the files.\n<function=execute_bash>\n<parameter=cmd>ls -la</parameter>\n</function>\n"
        "<function=finish>\n<parameter=command>submit</parameter>\n</function>"
    )
    action = parse_action(text)
    assert action == Action("execute_bash", {"cmd": "ls -la"}, "I will list the files.")
    assert action.error is None and not action.is_finish


def test_multiline_parameters_and_submit_alias():
    text = (
        "Create it.\n<function=file_editor>\n<parameter=command>create</parameter>\n<parameter=path>/t/a.py"
        "</parameter>\n<parameter=file_text>\nline 1\n  line 2\n</parameter>\n</function>"
    )
    action = parse_action(text)
    assert action.parameters == {"command": "create", "path": "/t/a.py", "file_text": "line 1\n  line 2"}
    assert parse_action("<function=submit>\n</function>").is_finish


def test_missing_or_malformed_calls_give_an_error_observation():
    assert "No function call found" in parse_action("I think the bug is in parse().").error
    assert "closing </function>" in parse_action("<function=execute_bash>\n<parameter=cmd>ls</parameter>").error
    assert "Unknown function 'rm_rf'" in parse_action("<function=rm_rf>\n</function>").error
    assert "has no name" in parse_action("<function=>\n</function>").error


def test_round_trip_through_text():
    action = Action("search", {"search_term": "def parse", "path": "/repo"}, "Look for it.")
    assert parse_action(action.to_text()) == action


def test_prompts():
    for name in TOOL_NAMES:
        assert "BEGIN FUNCTION" in SYSTEM_PROMPT and name in SYSTEM_PROMPT
    prompt = instance_prompt("Fix clamp.", "/tmp/repo", 100)
    assert "/tmp/repo" in prompt and "Fix clamp." in prompt and prompt.endswith("Steps Remaining: 100")
    assert with_steps_remaining("Exit code: 0\n", 7) == "Exit code: 0\nSteps Remaining: 7"


FRAGMENTS = st.sampled_from(
    [
        "<function=",
        "<function=execute_bash>",
        "</function>",
        "<parameter=",
        "<parameter=cmd>",
        "</parameter>",
        ">",
        "<",
        "=",
        "\n",
        "submit",
        "finish",
        "file_editor",
        " ",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), FRAGMENTS), max_size=30).map("".join))
def test_parse_action_never_raises(text):
    action = parse_action(text)
    assert (action.name is None) == (action.error is not None)
    if action.name is not None:
        assert action.name in TOOL_NAMES
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in action.parameters.items())


@given(st.binary(max_size=200))
def test_parse_action_survives_decoded_bytes(raw):
    parse_action(raw.decode("utf-8", errors="replace"))


def test_system_prompt_is_the_real_r2e_prompt_but_for_three_deliberate_edits():
    """The authors' R2E system prompt (the real fixture's `history[0]`), minus the interactive-process features the
    local and Docker sandboxes do not offer (exit code -1, empty / "ctrl+c" commands), and with `concise` described
    as the sandbox applies it (long Python files only)."""
    import json

    from test_trajectory import _fixture

    real = json.loads(_fixture("r2egym_trajectories_qwen3coder.jsonl").read_text().splitlines()[0])["history"][0]
    lines = real["content"].splitlines()
    dropped = (
        "If the bash command returns exit code -1",
        "Call this function again with command as an empty string",
        "Send more input to STDIN",
        'Send command="ctrl+c"',
        'Can be empty ("")',
        'Can be "ctrl+c"',
    )
    edited = []
    for line in lines:
        if any(text in line for text in dropped):
            continue
        line = line.replace("Defaults to True; displays a concise", "Displays a concise")
        line = line.replace("it will be interrupted (SIGINT).", "it will be interrupted.")
        edited.append(line)
    assert len(lines) - len(edited) == 6
    assert "\n".join(edited) == SYSTEM_PROMPT.rstrip("\n")
