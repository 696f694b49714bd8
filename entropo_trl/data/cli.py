"""`entropo data` (alias `entropo-data`): trajectory pools to SFT / DPO / KTO / verifier datasets, and LLaMA-Factory
ShareGPT export / import.

    entropo data kto --input pool.jsonl --output data/kto            # a `datasets` dataset (save_to_disk)
    entropo data dpo --input a.jsonl b.jsonl --policy authors --output pairs.jsonl
    entropo data sft --input swesmith.jsonl --tokenizer Qwen/Qwen3-4B-Instruct-2507 --max_tokens 18000 \\
        --push_to_hub me/entropo-sft
    entropo data sharegpt-export --input pairs.jsonl --output llamafactory/pairs.json --name entropo_dpo

The scripts in `data_prep/` call the same commands. Each prints a summary: rows, skips by reason, token-length
percentiles (with `--tokenizer`; character lengths otherwise). An `--output` that is one of the `--input` files (by
any path to it) is refused before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .builders import Rows, build_dpo_pairs, build_kto_rows, build_sft_rows, build_verifier_rows, row_messages
from .readers import FORMATS, ReadStats, read_trajectories
from .sharegpt import export_sharegpt, import_sharegpt, sharegpt_dataset_info, sharegpt_kind, upstream_warning
from .truncation import count_tokens


def _progress(iterable: Iterable, description: str) -> Iterable:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=description, unit=" rows", disable=os.environ.get("TQDM_DISABLE") == "1")


def percentiles(values: list[int], points=(50, 90, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles (`p100` is the maximum)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        rank = max(1, -(-p * len(ordered) // 100))  # ceil(p/100 * n)
        out[f"p{p}"] = ordered[min(rank, len(ordered)) - 1]
    return out


def write_rows(
    rows: Iterable[dict[str, Any]],
    output: str | None,
    push_to_hub: str | None,
    tokenizer=None,
    description: str = "writing",
    measure: bool = True,
) -> dict[str, Any]:
    """Stream rows to `output` (`.jsonl` / `.json` file, or a `datasets` folder) and/or the Hub; returns lengths
    (of builder rows, when `measure`)."""
    if output is None and push_to_hub is None:
        raise SystemExit("nothing to do: give --output PATH and/or --push_to_hub REPO")
    lengths: list[int] = []
    jsonl_target = output is not None and output.endswith((".jsonl", ".json"))
    workdir = None
    if jsonl_target:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
    else:
        workdir = tempfile.mkdtemp(prefix="entropo-data-")
        partial = Path(workdir) / "rows.jsonl"
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            for row in _progress(rows, description):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                if measure:
                    messages = row_messages(row)
                    lengths.append(
                        count_tokens(tokenizer, messages)
                        if tokenizer is not None
                        else sum(len(m["content"]) for m in messages)
                    )
                count += 1
        if jsonl_target:
            os.replace(partial, output)  # the finished file appears at once; an interrupted run leaves only .partial
        if not jsonl_target or push_to_hub:
            from datasets import Dataset

            source = output if jsonl_target else str(partial)
            dataset = Dataset.from_json(source) if count else Dataset.from_list([])
            if output is not None and not jsonl_target:
                dataset.save_to_disk(output)
            if push_to_hub:
                dataset.push_to_hub(push_to_hub)
    finally:
        if workdir is not None:  # the staging file of a dataset folder or a push
            shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": count, "lengths": lengths, "unit": "tokens" if tokenizer is not None else "characters"}


def _load_tokenizer(name: str | None):
    if name is None:
        return None
    from transformers import AutoTokenizer

    from ..loading import load_pretrained

    return load_pretrained(AutoTokenizer, name, "tokenizer (--tokenizer)")


def _summary(kind: str, read: ReadStats | None, stats, written: dict[str, Any], output, push) -> str:
    lines = [f"[entropo-data {kind}]"]
    if read is not None:
        lines.append(f"  read: {read.summary()}")
    if stats is not None:
        lines.append(f"  built: {stats.summary()}")
        for key, value in stats.extra.items():
            lines.append(f"  {key}: {value}")
    lines.append(f"  rows written: {written['rows']}")
    if written["lengths"]:
        lines.append(f"  {written['unit']} per row: {percentiles(written['lengths'])}")
    if output:
        lines.append(f"  output: {output}")
    if push:
        lines.append(f"  pushed to the Hub: {push}")
    return "\n".join(lines)


def _read_json_rows(paths: list[str]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".json") and handle.read(1) == "[":
                handle.seek(0)
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
                yield from rows
                continue
            handle.seek(0)
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SystemExit(f"{path}, line {number}: invalid JSON ({exc.msg})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropo data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub, pool: bool = True):
        sub.add_argument("--input", nargs="+", required=True, help="pool file(s) (JSONL)")
        sub.add_argument("--output", help="a .jsonl / .json file, or a folder for a `datasets` dataset")
        sub.add_argument("--push_to_hub", metavar="REPO", help="also push the dataset to this Hub repository")
        if pool:
            sub.add_argument("--format", choices=FORMATS, default="auto", help="pool layout (default: detected)")
            sub.add_argument(
                "--on_error",
                choices=["raise", "skip"],
                default="raise",
                help="malformed pool lines: stop with the file, line and field (default) or skip them, "
                "counted by reason",
            )
            sub.add_argument("--source", help="override the trajectories' source (model / run name)")
            sub.add_argument(
                "--default_reward",
                type=float,
                help="reward, in [0, 1], of SWE-smith lines that carry no reward / resolved (they are then "
                "labelled); without it they are unlabelled and skipped, counted, except by sft, which reads them "
                "as resolved (1.0: SWE-smith's released files hold resolved teacher runs)",
            )
            sub.add_argument(
                "--keep_hints",
                action="store_true",
                help="keep a reference-patch hint (<gt_patch>...</gt_patch>, appended to the issue by the EntroPO "
                "authors' R2E-Gym fork) in the prompts; by default it is removed and counted",
            )
            sub.add_argument("--tokenizer", help="tokenizer (Hub id or folder) for token budgets and lengths")
            sub.add_argument(
                "--max_tokens",
                type=int,
                help="fit each trajectory into this many tokens "
                "(shortens observations, then middle turns; never the final assistant turn)",
            )
            sub.add_argument(
                "--include_unfinished",
                action="store_true",
                help="also use trajectories whose last turn did not call finish/submit",
            )

    sft = commands.add_parser("sft", help="SFT rows ({'messages'})")
    common(sft)
    sft.add_argument("--require_success", action="store_true", help="keep passing trajectories only")
    dpo = commands.add_parser("dpo", help="DPO pairs ({'prompt', 'chosen', 'rejected'})")
    common(dpo)
    dpo.add_argument("--policy", choices=["all", "authors"], default="all")
    dpo.add_argument(
        "--max_pairs_per_instance", type=int, default=None, help="cap for --policy all (default 4; 0: no cap)"
    )
    dpo.add_argument("--seed", type=int, default=None, help="sampling seed for the cap of --policy all (default 0)")
    kto = commands.add_parser("kto", help="KTO rows ({'prompt', 'completion', 'label'})")
    common(kto)
    verifier = commands.add_parser("verifier", help="verifier rows (judge conversations ending in a judgement)")
    common(verifier)
    # the verifier recipes train at max_length 32768: rows longer than that would be skipped there
    verifier.set_defaults(max_tokens=32_768)
    export = commands.add_parser("sharegpt-export", help="builder rows (JSONL) to LLaMA-Factory ShareGPT")
    common(export, pool=False)
    export.add_argument("--name", help="also write dataset_info.json beside the output with this dataset name")
    export.add_argument(
        "--single_turn",
        action="store_true",
        help="write each DPO pair's chosen / rejected as one message object (upstream LLaMA-Factory's layout); "
        "refuses pairs with several messages on a side",
    )
    imp = commands.add_parser("sharegpt-import", help="LLaMA-Factory ShareGPT rows to builder rows")
    common(imp, pool=False)
    return parser


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: relative paths, `..` and symbolic links resolved (and hard links, when both
    exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options that contradict each other or would be ignored (exit status 2, before anything is read)."""
    if args.output is not None:
        for path in args.input:
            if same_file(args.output, path):
                parser.error(
                    f"--output {args.output} is the --input file {path}: writing would replace what is being read; "
                    "give another --output"
                )
    default_reward = getattr(args, "default_reward", None)
    if default_reward is not None and not 0.0 <= default_reward <= 1.0:
        parser.error(f"--default_reward must be in [0, 1], got {default_reward:g}")
    if args.command == "dpo":
        if args.policy == "authors" and (args.max_pairs_per_instance is not None or args.seed is not None):
            parser.error("--max_pairs_per_instance and --seed apply to --policy all only")
        args.max_pairs_per_instance = 4 if args.max_pairs_per_instance is None else args.max_pairs_per_instance
        args.seed = 0 if args.seed is None else args.seed
    if getattr(args, "max_tokens", None) is not None and args.max_tokens < 1:
        parser.error(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if args.command == "sharegpt-export" and args.name and not args.output:
        parser.error("--name writes dataset_info.json beside --output: give --output")


def run_sharegpt(args: argparse.Namespace) -> int:
    """`sharegpt-export` / `sharegpt-import`: convert builder rows to LLaMA-Factory's ShareGPT layout or back."""
    rows = list(_read_json_rows(args.input))
    exported = args.command == "sharegpt-export"  # ShareGPT rows have no builder messages to measure
    try:
        converted = list(export_sharegpt(rows, args.single_turn) if exported else import_sharegpt(rows))
    except ValueError as error:
        raise SystemExit(f"{', '.join(args.input)}: {error}") from None
    kinds = {sharegpt_kind(row) for row in converted} if exported else set()
    if exported and args.single_turn and "dpo" not in kinds:
        raise SystemExit(
            f"{', '.join(args.input)}: --single_turn writes DPO pairs' chosen / rejected as single messages, and these "
            f"rows hold no pair ({', '.join(sorted(kinds)) or 'no rows'}); drop --single_turn"
        )
    if exported and args.output and args.output.endswith(".json"):  # LLaMA-Factory reads a JSON array
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(converted, ensure_ascii=False, indent=1), encoding="utf-8")
        written = {"rows": len(converted), "lengths": [], "unit": "characters"}
        if args.push_to_hub:
            write_rows(converted, None, args.push_to_hub, description=args.command, measure=False)
    else:
        written = write_rows(converted, args.output, args.push_to_hub, description=args.command, measure=not exported)
    if exported and args.name and args.output:
        info = Path(args.output).parent / "dataset_info.json"
        entries = json.loads(info.read_text()) if info.exists() else {}
        kind = sharegpt_kind(converted[0]) if converted else "sft"
        entries.update(sharegpt_dataset_info(args.name, Path(args.output).name, kind))
        info.write_text(json.dumps(entries, indent=2))
    print(_summary(args.command, None, None, written, args.output, args.push_to_hub))
    for kind in sorted(kinds):
        warning = upstream_warning(kind, args.single_turn)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def build_rows(args: argparse.Namespace, tokenizer, read: ReadStats) -> Rows:
    """Read the pools and build the command's rows (lazily: they stream to the writer)."""
    default_reward = args.default_reward
    if default_reward is None and args.command == "sft":
        default_reward = 1.0  # SFT keeps teacher runs; SWE-smith / SWE-agent files hold resolved ones only
    trajectories = read_trajectories(
        args.input,
        args.format,
        on_error=args.on_error,
        stats=read,
        source=args.source,
        default_reward=default_reward,
        keep_hints=args.keep_hints,
    )
    finished_only = not args.include_unfinished
    budget = {"tokenizer": tokenizer, "max_tokens": args.max_tokens}
    if args.command == "sft":
        return build_sft_rows(trajectories, args.require_success, finished_only=finished_only, **budget)
    if args.command == "dpo":
        cap = args.max_pairs_per_instance or None
        return build_dpo_pairs(trajectories, args.policy, cap, args.seed, finished_only=finished_only, **budget)
    if args.command == "kto":
        return build_kto_rows(trajectories, finished_only, **budget)
    return build_verifier_rows(trajectories, tokenizer, args.max_tokens, finished_only=finished_only)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.command in ("sharegpt-export", "sharegpt-import"):
        return run_sharegpt(args)
    if args.command == "verifier" and args.tokenizer is None:
        print(
            f"[entropo-data verifier] no --tokenizer: the {args.max_tokens}-token budget is estimated at 4 characters "
            "a token; pass the verifier's tokenizer for exact counts",
            file=sys.stderr,
        )
    tokenizer = _load_tokenizer(args.tokenizer)
    read = ReadStats()
    rows = build_rows(args, tokenizer, read)
    written = write_rows(rows, args.output, args.push_to_hub, tokenizer, description=f"building {args.command}")
    print(_summary(args.command, read, rows.stats, written, args.output, args.push_to_hub))
    return 0


if __name__ == "__main__":
    sys.exit(main())
