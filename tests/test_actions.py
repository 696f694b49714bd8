"""The agent's call format is parsed in one place: the runner, the trajectory readers and the metrics agree."""

import pytest

import entropo_trl.rollout.scaffold as scaffold
import entropo_trl.rollout.tools as tools
from entropo_trl import actions
from entropo_trl.actions import Action, message_action, parse_action
from entropo_trl.data.trajectory import Trajectory, last_turn_finished
from entropo_trl.evaluation.metrics import action_sequence

BASH = "<function=execute_bash>\n<parameter=cmd>ls</parameter>\n</function>"
FINISH = "<function=finish>\n<parameter=command>submit</parameter>\n</function>"

TURNS = {
    "finish": "Done.\n" + FINISH,
    "submit alias": "<function=submit>\n</function>",
    "finish second": "First list.\n" + BASH + "\n" + FINISH,
    "finish first": FINISH + "\n" + BASH,
    "bash": BASH,
    "file_editor view": "<function=file_editor>\n<parameter=command>view</parameter>\n<parameter=path>/t</parameter>\n"
    "</function>",
    "no call": "I think the bug is in parse().",
    "unclosed finish": "<function=finish>\n<parameter=command>submit</parameter>",
    "unnamed": "<function=>\n</function>",
    "other scaffold's tool": "<function=str_replace_editor>\n<parameter=command>view</parameter>\n</function>",
}


def _trajectory(content: str) -> Trajectory:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "issue"}]
    messages.append({"role": "assistant", "content": content})
    return Trajectory(instance_id="i", messages=messages, reward=0.0)


def test_a_last_turn_whose_second_call_is_finish_is_not_finished():
    text = TURNS["finish second"]
    assert parse_action(text).name == "execute_bash"  # what the runner executes
    assert not last_turn_finished(_trajectory(text).messages)
    assert action_sequence(_trajectory(text)) == ["execute_bash"]
    assert last_turn_finished(_trajectory(TURNS["finish first"]).messages)


@pytest.mark.parametrize("name", sorted(TURNS))
def test_the_runner_the_readers_and_the_metrics_read_a_turn_alike(name):
    text = TURNS[name]
    runner = parse_action(text)  # the scaffold's tools only
    recorded = message_action({"role": "assistant", "content": text})  # any tool name
    trajectory = _trajectory(text)
    assert last_turn_finished(trajectory.messages) == runner.is_finish == recorded.is_finish
    [label] = action_sequence(trajectory)
    assert label.split(":")[0] == (recorded.name or "none")
    if runner.name is not None:
        assert recorded == runner
    else:
        assert recorded.name in (None, "str_replace_editor")


def test_recorded_turns_accept_other_scaffolds_tools_and_structured_calls():
    assert "Unknown function 'str_replace_editor'" in parse_action(TURNS["other scaffold's tool"]).error
    assert parse_action(TURNS["other scaffold's tool"], tool_names=None) == Action(
        "str_replace_editor", {"command": "view"}
    )
    structured = {
        "role": "assistant",
        "content": "Look first.",
        "tool_calls": [
            "not a call",
            {"function": {"name": "file_editor", "arguments": '{"command": "view", "view_range": [1, 2]}'}},
            {"function": {"name": "finish"}},
        ],
    }
    action = message_action(structured)
    assert action == Action("file_editor", {"command": "view", "view_range": "[1, 2]"}, "Look first.")
    assert message_action({**structured, "content": BASH}).name == "execute_bash"  # the text call comes first
    submit = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "submit"}}]}
    assert message_action(submit).name == "finish"
    assert message_action({"role": "assistant", "content": None}).error.startswith("No function call found")


def test_the_scaffold_and_the_tools_use_this_parser():
    for name in ("Action", "parse_action", "FINISH_NAMES", "TOOL_NAMES"):
        assert getattr(scaffold, name) is getattr(actions, name)
    assert tools.Action is Action and tools.FINISH_NAMES is actions.FINISH_NAMES
