"""Toy tasks: small real Python repositories with one planted bug and a pytest suite, for tests and the demo.

Each task is a folder with `task.json` (SWE-bench fields: `instance_id`, `problem_statement`, `FAIL_TO_PASS`,
`PASS_TO_PASS`, `test_command`) and `repo/` (a package `toolkit/` and `tests/`). The bug's reference fix is kept in
`task.json` under `reference_fix` (for scripted policies and checks), never in the repository itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .tasks import DEFAULT_TEST_COMMAND, Task, load_local_tasks

# name: (correct line, buggy line, issue text, tests)
FUNCTIONS = {
    "clamp": (
        "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, lo))\n",
        "`toolkit.clamp(x, lo, hi)` returns `lo` for values inside the range: `clamp(5, 0, 10)` gives 0 instead of 5.",
        ["assert clamp(5, 0, 10) == 5", "assert clamp(-3, 0, 10) == 0", "assert clamp(12, 0, 10) == 10"],
    ),
    "mean": (
        "def mean(values):\n    return sum(values) / len(values)\n",
        "def mean(values):\n    return sum(values) / (len(values) + 1)\n",
        "`toolkit.mean([2, 4])` returns 2.0 instead of 3.0: the average is computed with the wrong count.",
        ["assert mean([2, 4]) == 3.0", "assert mean([5]) == 5.0"],
    ),
    "is_palindrome": (
        "def is_palindrome(text):\n    letters = [c.lower() for c in text if c.isalnum()]\n"
        "    return letters == letters[::-1]\n",
        "def is_palindrome(text):\n    letters = [c for c in text if c.isalnum()]\n    return letters == letters[::-1]\n",
        "`toolkit.is_palindrome('Racecar')` is False: the check should ignore case (and punctuation).",
        [
            "assert is_palindrome('Racecar')",
            "assert is_palindrome('A man, a plan, a canal: Panama')",
            "assert not is_palindrome('toolkit')",
        ],
    ),
    "count_words": (
        "def count_words(text):\n    return len(text.split())\n",
        "def count_words(text):\n    return len(text.split(' '))\n",
        "`toolkit.count_words('a  b')` returns 3: repeated spaces, tabs and newlines are counted as extra words.",
        [
            "assert count_words('a  b') == 2",
            "assert count_words('one\\ttwo\\nthree') == 3",
            "assert count_words('hello world') == 2",
        ],
    ),
    "last_n": (
        "def last_n(items, n):\n    return items[-n:] if n > 0 else []\n",
        "def last_n(items, n):\n    return items[-n:]\n",
        "`toolkit.last_n([1, 2, 3], 0)` returns the whole list instead of an empty list.",
        ["assert last_n([1, 2, 3], 0) == []", "assert last_n([1, 2, 3], 2) == [2, 3]"],
    ),
    "slugify": (
        "def slugify(text):\n    return '-'.join(text.lower().split())\n",
        "def slugify(text):\n    return text.lower().replace(' ', '-')\n",
        "`toolkit.slugify('  Hello   World ')` gives '--hello---world-' instead of 'hello-world'.",
        ["assert slugify('  Hello   World ') == 'hello-world'", "assert slugify('Hello World') == 'hello-world'"],
    ),
}


def _write_repo(repo: Path, buggy: str) -> tuple[list[str], list[str]]:
    """Write the package with `buggy`'s bug planted and the tests; returns (FAIL_TO_PASS, PASS_TO_PASS) node ids."""
    (repo / "toolkit").mkdir(parents=True)
    (repo / "tests").mkdir()
    source = ['"""toolkit: small helpers."""\n']
    for name, (correct, bug, _, _) in FUNCTIONS.items():
        source.append("\n\n" + (bug if name == buggy else correct))
    (repo / "toolkit" / "core.py").write_text("".join(source))
    (repo / "toolkit" / "__init__.py").write_text(
        "from .core import " + ", ".join(FUNCTIONS) + "\n\n__all__ = " + repr(list(FUNCTIONS)) + "\n"
    )
    tests = ["from toolkit import " + ", ".join(FUNCTIONS) + "\n"]
    fail_to_pass, pass_to_pass = [], []
    for name, (_, _, _, asserts) in FUNCTIONS.items():
        for k, line in enumerate(asserts):
            test = f"test_{name}_{k}"
            tests.append(f"\n\ndef {test}():\n    {line}\n")
            node = f"tests/test_core.py::{test}"
            (fail_to_pass if name == buggy and not _passes_with_bug(name, line) else pass_to_pass).append(node)
    (repo / "tests" / "test_core.py").write_text("".join(tests))
    (repo / "README.md").write_text("# toolkit\n\nSmall helpers. Run the tests with `python -m pytest`.\n")
    return fail_to_pass, pass_to_pass


def _passes_with_bug(name: str, assertion: str) -> bool:
    """Whether one assertion already holds with the bug planted (it is then a PASS_TO_PASS test)."""
    namespace: dict = {}
    exec(FUNCTIONS[name][1], namespace)  # noqa: S102 - our own fixed source
    try:
        exec(assertion, namespace)  # noqa: S102
    except AssertionError:
        return False
    return True


def make_toy_tasks(dest: str | Path, n: int = 6, seed: int = 0) -> list[Task]:
    """Write `n` toy tasks under `dest` (one bug each, cycling through the functions in a seeded order) and return
    them. Existing task folders are kept (so a resumed demo sees the same tasks)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = list(FUNCTIONS)
    random.Random(seed).shuffle(names)
    for i in range(n):
        buggy = names[i % len(names)]
        instance_id = f"toy__toolkit-{i + 1}"
        task_dir = dest / instance_id
        if (task_dir / "task.json").exists():
            continue
        task_dir.mkdir(parents=True, exist_ok=True)
        fail_to_pass, pass_to_pass = _write_repo(task_dir / "repo", buggy)
        correct, bug, issue, _ = FUNCTIONS[buggy]
        task = {
            "instance_id": instance_id,
            "repo": "toy/toolkit",
            "problem_statement": issue,
            "FAIL_TO_PASS": fail_to_pass,
            "PASS_TO_PASS": pass_to_pass,
            "test_command": DEFAULT_TEST_COMMAND,
            "reference_fix": {"path": "toolkit/core.py", "old": bug, "new": correct, "function": buggy},
        }
        (task_dir / "task.json").write_text(json.dumps(task, indent=2))
    wanted = {f"toy__toolkit-{i + 1}" for i in range(n)}
    return [t for t in load_local_tasks(dest) if t.instance_id in wanted]


# The reward hack the oracle must defeat (issue: tamper-proof oracle): a root `conftest.py` whose hook reports every
# test as passed. On the toy tasks it is worth reward 1 when the oracle does not restore the test infrastructure.
CONFTEST_REWARD_HACK = (
    "import pytest\n\n\n"
    "@pytest.hookimpl(hookwrapper=True)\n"
    "def pytest_runtest_makereport(item, call):\n"
    "    outcome = yield\n"
    "    report = outcome.get_result()\n"
    '    report.outcome = "passed"\n'
    "    report.longrepr = None\n"
)
