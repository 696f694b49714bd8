"""Resumable runs: a run is a list of [`Stage`]s under one work folder, and a rerun skips the stages it finished.

    stages = [
        Stage("1/2 data", partial(build_data, pool, run / "data"), marker="data/.done", output=run / "data"),
        Stage("2/2 train", partial(train, run / "data", run / "model"), marker="train.done", output=run / "model",
              describe=lambda result: f"{result['steps']} steps -> {run / 'model'}"),
    ]
    data_counts, training = run_stages(stages, run, prefix="alpha")

A stage with a marker writes it once it has finished, holding what the stage returned; a rerun returns that record
instead of running the stage again. [`pin_options`] refuses to resume a folder made with other options.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def say(prefix: str, name: str, message: str) -> None:
    """A progress line: `[prefix] name: message`."""
    print(f"[{prefix}] {name}: {message}", flush=True)


@dataclass
class Stage:
    """One step of a resumable run.

    Args:
        name: what the progress lines call it (`"3/6 rollouts"`).
        run: does the work and returns its result; with a `marker`, a JSON-serialisable one (it is recorded).
        marker: the file that records a finished run of the stage: a path relative to the work folder, or an absolute
            one inside it; `None` for a stage that runs every time (cheap, or whose result is not a file).
        output: where the stage's output goes, named in the line a skipped stage prints.
        describe: the line printed after the stage ran, from its result.
    """

    name: str
    run: Callable[[], Any]
    marker: str | Path | None = None
    output: str | Path | None = None
    describe: Callable[[Any], str] = lambda result: "done"


def run_or_skip(stage: Stage, workdir: str | Path, prefix: str) -> Any:
    """Run `stage` and record its result in its marker, or, when the marker says it finished, return that record."""
    marker = Path(workdir) / stage.marker if stage.marker is not None else None
    if marker is not None and marker.exists():
        say(prefix, stage.name, f"done before, {stage.output}")
        return json.loads(marker.read_text())
    result = stage.run()
    if marker is not None:
        write_atomically(marker, json.dumps(result, indent=2))
    say(prefix, stage.name, stage.describe(result))
    return result


def run_stages(stages: Sequence[Stage], workdir: str | Path, prefix: str) -> list[Any]:
    """Run (or skip, see [`run_or_skip`]) `stages` in order; returns their results in that order."""
    return [run_or_skip(stage, workdir, prefix) for stage in stages]


def write_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a kill mid-write leaves the old file, or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def pin_options(
    workdir: str | Path, options: dict[str, Any], what: str = "run", folder_flag: str = "--workdir"
) -> None:
    """Record the options that decide a run's results under `workdir`; a rerun with other values would mix two runs,
    so it is refused (`SystemExit`), naming the differences."""
    recorded = Path(workdir) / "options.json"
    if recorded.exists():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in {*before, *options} if before.get(k) != options.get(k))
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} then, {options.get(k)!r} now" for k in changed)
            raise SystemExit(
                f"{workdir} holds a {what} made with other options ({details}); use another {folder_flag}, or "
                "delete this one to start again"
            )
    write_atomically(recorded, json.dumps(options))
