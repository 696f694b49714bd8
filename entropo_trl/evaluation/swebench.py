"""SWE-bench evaluation of chosen trajectories with the official harness (`swebench.harness.run_evaluation`).

The path is: chosen trajectories -> [`write_predictions`] (the harness's JSONL predictions file, without the
patches' edits to test infrastructure unless `keep_test_edits`) -> [`run_harness`] (which needs a Docker daemon) ->
[`read_report`] (per-instance resolved flags). The harness's side (its command, runs and reports) lives in
`entropo_trl.evaluation.harness`; its names are importable from here too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.trajectory import Trajectory
from ..rollout.oracle import is_test_infrastructure, split_patch
from .harness import (
    DEFAULT_DATASET,
    HARNESS_MODULE,
    DockerUnavailableError,
    HarnessReportError,
    docker_available,
    harness_command,
    harness_flags,
    model_dir_name,
    read_report,
    run_harness,
)

__all__ = [
    "DEFAULT_DATASET",
    "HARNESS_MODULE",
    "DockerUnavailableError",
    "HarnessReportError",
    "PredictionsSummary",
    "docker_available",
    "harness_command",
    "harness_flags",
    "model_dir_name",
    "read_report",
    "run_harness",
    "without_test_edits",
    "write_predictions",
]

logger = logging.getLogger(__name__)


def _prediction_pairs(items: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(items, Mapping):
        for instance_id, value in items.items():
            if isinstance(value, Trajectory):
                if value.instance_id != instance_id:
                    raise ValueError(
                        f"predictions: key {instance_id!r} holds a trajectory of instance {value.instance_id!r}"
                    )
                yield instance_id, value.patch
            else:
                yield instance_id, value
        return
    for item in items:
        if isinstance(item, Trajectory):
            yield item.instance_id, item.patch
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            yield item[0], item[1]
        else:
            raise TypeError(
                f"predictions: expected Trajectory objects or (instance_id, patch) pairs, got {type(item).__name__}"
            )


@dataclass
class PredictionsSummary:
    """What [`write_predictions`] wrote: `written` rows, `empty` of them with an empty patch (after filtering), and
    per instance the test-infrastructure paths whose edits were left out of its patch (instances with none are not
    listed)."""

    path: str
    written: int
    empty: int
    dropped_test_edits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        """Test-infrastructure file edits left out, over all predictions."""
        return sum(len(paths) for paths in self.dropped_test_edits.values())


def without_test_edits(patch: str) -> tuple[str, list[str]]:
    """`patch` without the file sections that touch test infrastructure
    ([`entropo_trl.rollout.oracle.is_test_infrastructure`]: test files and directories, `conftest.py`, pytest / tox /
    setup.cfg / pyproject.toml configuration), and the paths left out. A section that renames a file into or out of
    test infrastructure is left out whole. Patches are read as `git diff` writes them; text outside file sections is
    kept as it is."""
    kept, dropped = [], []
    for section in split_patch(patch):
        infrastructure = [p for p in section.paths if is_test_infrastructure(p)]
        if infrastructure:
            dropped += [p for p in infrastructure if p not in dropped]
        else:
            kept.append(section.text)
    return "".join(kept), dropped


def write_predictions(
    path: str | os.PathLike, items: Any, model_name: str, *, keep_test_edits: bool = False
) -> PredictionsSummary:
    """Write a SWE-bench predictions file: one JSONL row `{"instance_id", "model_name_or_path", "model_patch"}` per
    instance, the format `swebench.harness.utils.get_predictions_from_file` reads.

    Args:
        path: the output file; must end in `.jsonl` (or `.json`, which the harness would read as one JSON list, so
            it is refused here: use `.jsonl`).
        items: [`Trajectory`] objects, `(instance_id, patch)` pairs, or a `{instance_id: Trajectory | patch}` dict.
            A second prediction for an instance is an error naming it.
        model_name: `model_name_or_path`; the harness names its log folder and summary report after it.
        keep_test_edits: keep the patches' edits to test infrastructure. By default they are left out
            ([`without_test_edits`]), as the rollout oracle drops them: the official harness resets only the files of
            the instance's test patch, so a patch that adds a `conftest.py` forcing every outcome to "passed" would
            otherwise be graded resolved.

    Empty (or missing) patches are written as `""`, and so is a patch that held only test edits; the harness does
    not run them and counts them unresolved (`empty_patch_ids`). The file is written to `path + ".partial"` and
    moved into place, so a reader never sees half a file.

    Returns:
        A [`PredictionsSummary`]: rows written, how many have an empty patch, and the test edits left out.
    """
    path = os.fspath(path)
    if not path.endswith(".jsonl"):
        raise ValueError(f"predictions path must end in .jsonl (the harness picks its reader by suffix): {path}")
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    seen: set[str] = set()
    summary = PredictionsSummary(path, 0, 0)
    partial = path + ".partial"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for instance_id, patch in _prediction_pairs(items):
                if not isinstance(instance_id, str) or not instance_id:
                    raise ValueError(f"predictions: instance_id must be a non-empty string, got {instance_id!r}")
                if instance_id in seen:
                    raise ValueError(
                        f"predictions: duplicate instance_id {instance_id!r} (one prediction per instance)"
                    )
                seen.add(instance_id)
                if patch is None:
                    patch = ""
                if not isinstance(patch, str):
                    raise TypeError(
                        f"predictions: patch of {instance_id!r} must be a string, got {type(patch).__name__}"
                    )
                if not keep_test_edits:
                    patch, dropped = without_test_edits(patch)
                    if dropped:
                        summary.dropped_test_edits[instance_id] = dropped
                if not patch.strip():
                    patch = ""
                    summary.empty += 1
                row = {"instance_id": instance_id, "model_name_or_path": model_name, "model_patch": patch}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                summary.written += 1
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    logger.info(
        "wrote %d predictions to %s (%d with an empty patch, counted unresolved; %d test-infrastructure edits left out "
        "of %d)",
        summary.written,
        path,
        summary.empty,
        summary.num_dropped,
        len(summary.dropped_test_edits),
    )
    return summary
