"""Write SWE-bench predictions from chosen trajectories and, with `--run`, grade them with the official harness.

    python eval/swebench_eval.py --selection SELECTED.jsonl --predictions preds.jsonl --model_name my-model
    python eval/swebench_eval.py --pool POOL.jsonl --selector paper-verified --predictions preds.jsonl \\
        --run --run_id my-run --max_workers 8

`--selection` holds one chosen trajectory per instance (a second one for an instance is an error); `--pool` holds N
candidates per instance and the hybrid selector (`--selector`, a preset of `entropo_trl.selection`) picks one.
The patches' edits to test infrastructure (test files, `conftest.py`, pytest / tox configuration) are left out of the
predictions, as the rollout oracle drops them, and counted; `--keep_test_edits` keeps them.
The harness needs a Docker daemon: without one the predictions are still written, the command to run elsewhere is
printed, and the exit status is 2.
"""

from __future__ import annotations

import os
import sys

# a script's folder comes first on sys.path: keep this folder's modules (e.g. eval/select.py) from shadowing the
# standard library's (`select`, imported by subprocess)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from entropo_trl.selection import PRESETS  # noqa: E402
from entropo_trl.swebench_eval import (  # noqa: E402
    DEFAULT_DATASET,
    DockerUnavailableError,
    run_harness,
    write_predictions,
)
from entropo_trl.trajectory import read_trajectories  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pool", help="trajectory pool (JSONL), N candidates per instance; --selector picks one")
    source.add_argument("--selection", help="chosen trajectories (JSONL), one per instance")
    parser.add_argument(
        "--selector", choices=sorted(PRESETS), default="paper-verified", help="selector preset for --pool"
    )
    parser.add_argument("--predictions", required=True, help="output predictions file (.jsonl)")
    parser.add_argument("--model_name", default=None, help="model_name_or_path (default: the trajectories' source)")
    parser.add_argument(
        "--keep_test_edits",
        action="store_true",
        help="keep the patches' edits to test files, conftest.py and test configuration (left out by default)",
    )
    parser.add_argument("--run", action="store_true", help="run the SWE-bench harness on the predictions")
    parser.add_argument("--dataset_name", default=DEFAULT_DATASET)
    parser.add_argument("--split", default="test")
    parser.add_argument("--run_id", default=None, help="harness run id (default: the predictions file's stem)")
    parser.add_argument("--max_workers", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=1800, help="per-instance test timeout (seconds)")
    parser.add_argument("--instance_ids", nargs="+", default=None, help="grade only these instances")
    parser.add_argument("--report_dir", default=None, help="where the harness writes its summary report")
    parser.add_argument("--docker", default="docker", help="docker CLI used to check for a daemon")
    return parser.parse_args(argv)


def choose(args: argparse.Namespace) -> list:
    if args.selection:
        return list(read_trajectories(args.selection))
    from entropo_trl.selection import HybridSelector, group_by_instance

    selector = HybridSelector(args.selector)
    pool = group_by_instance(read_trajectories(args.pool))
    return [selector.select(candidates).trajectory for candidates in pool.values()]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trajectories = choose(args)
    model_name = args.model_name
    if model_name is None:
        sources = {t.source for t in trajectories if t.source}
        model_name = sources.pop() if len(sources) == 1 else "entropo-trl"
    summary = write_predictions(args.predictions, trajectories, model_name, keep_test_edits=args.keep_test_edits)
    print(
        f"wrote {summary.written} predictions ({summary.empty} with an empty patch) for {model_name!r} to "
        f"{args.predictions}"
    )
    if args.keep_test_edits:
        print("test-infrastructure edits kept (--keep_test_edits)")
    else:
        print(
            f"left out {summary.num_dropped} test-infrastructure edits from {len(summary.dropped_test_edits)} "
            "predictions (--keep_test_edits keeps them)"
        )
    if not args.run:
        return 0
    try:
        resolved = run_harness(
            args.predictions,
            docker=args.docker,
            dataset_name=args.dataset_name,
            split=args.split,
            run_id=args.run_id or Path(args.predictions).stem,
            max_workers=args.max_workers,
            timeout=args.timeout,
            instance_ids=args.instance_ids,
            report_dir=args.report_dir,
        )
    except DockerUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = len(resolved)
    count = sum(resolved.values())
    rate = 100.0 * count / total if total else 0.0
    print(f"resolved {count} / {total} ({rate:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
