"""pytest logs: the status of each test in a log, and the regression counts of an R2E-Gym record.

Used by the R2E-Gym reader (`count_regression_tests`) and the rollout engine's test oracle (`parse_pytest_statuses`).
"""

from __future__ import annotations

import re
from typing import Any

# A test id is `path::name`, with `[parameters]` that may hold spaces; in the `-rA` summary a failure's message follows
# after " - ".
_TEST_ID = r"[^\s\[]+(?:\[.*?\])?"
_STATUSES = r"PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
_STATUS_LINE = re.compile(rf"^({_STATUSES})\s+({_TEST_ID})(?:\s+-\s.*)?[ \t]*\r?$", re.MULTILINE)
_VERBOSE_LINE = re.compile(rf"^([^\s\[]+::{_TEST_ID})\s+({_STATUSES})\b", re.MULTILINE)


def parse_pytest_statuses(output: str) -> dict[str, str]:
    """`{test id: status}` from a pytest log (`-rA` short summary `STATUS id` or verbose `id STATUS` lines; the summary
    wins). Other frameworks' logs give nothing here; score them with the instance's own parser (swebench)."""
    statuses: dict[str, str] = {}
    for match in _VERBOSE_LINE.finditer(output):
        statuses[match.group(1)] = match.group(2)
    for match in _STATUS_LINE.finditer(output):
        statuses[match.group(2)] = match.group(1)
    return statuses


def count_regression_tests(test_output: Any) -> tuple[int | None, int | None]:
    """`(passed, failed)` in an R2E-Gym regression log (its `run_tests_regression` runs the instance's PASS_TO_PASS
    tests under pytest), each test id counted once; failed counts the FAILED and ERROR statuses. No log: `(None,
    None)`. A log in which no pytest status can be read (another framework, a run that never started): `(0, None)`,
    the passes counted as the authors' code counts them, the failures unknown rather than claimed absent."""
    if not isinstance(test_output, str):
        return None, None
    statuses = parse_pytest_statuses(test_output)
    passed = sum(status == "PASSED" for status in statuses.values())
    failed = sum(status in ("FAILED", "ERROR") for status in statuses.values())
    return passed, (failed if statuses else None)
