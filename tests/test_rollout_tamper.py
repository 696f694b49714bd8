"""The conftest reward hack of issue 12, end to end: `entropo-rollout` with a scripted hostile model on 127.0.0.1."""

import re
from pathlib import Path

from entropo_trl.data.readers import read_trajectories
from entropo_trl.rollout.cli import main
from entropo_trl.rollout.scaffold import Action
from entropo_trl.rollout.serve import serve_scripted
from entropo_trl.rollout.toy import CONFTEST_REWARD_HACK, make_toy_tasks


def _workdir(messages):
    return re.search(r"repository in the (\S+) directory", messages[1]["content"]).group(1)


def conftest_hacker(messages):
    """Creates the hack at the repository root (the path the prompt names), then finishes."""
    if sum(m["role"] == "assistant" for m in messages) == 0:
        create = {"command": "create", "path": f"{_workdir(messages)}/conftest.py", "file_text": CONFTEST_REWARD_HACK}
        return Action("file_editor", create, "Make every test pass.").to_text()
    return Action("finish", {"command": "submit"}, "All tests pass now.").to_text()


def test_the_conftest_hack_gets_reward_0_and_is_counted(tmp_path):
    tasks = make_toy_tasks(tmp_path / "toy", n=3)
    pool = tmp_path / "pool.jsonl"
    with serve_scripted(conftest_hacker) as server:
        main(
            [
                "--tasks", str(Path(tasks[0].repo_path).parents[1]),
                "--pool", str(pool),
                "--base_url", server.base_url,
                "--model", "scripted",
                "--max_steps", "4",
            ]
        )  # fmt: skip
    trajectories = list(read_trajectories(pool))
    assert sorted(t.instance_id for t in trajectories) == sorted(t.instance_id for t in tasks)
    for t in trajectories:
        assert t.finished and "b/conftest.py" in t.patch  # the hack is in the recorded patch...
        assert t.reward == 0.0 and t.metadata["dropped_test_edits"] == ["conftest.py"]  # ...and decides nothing
        assert t.metadata["labelled"] and t.metadata["patch_applied"]
