"""`entropo`: one command for the whole pipeline. Each subcommand hands its arguments to a module's own `main(argv)`,
imported only when that subcommand runs (so `entropo data` never loads torch, and `entropo --help` loads nothing)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one line of help); the pipeline's order
COMMANDS = {
    "data": ("entropo_trl.data.cli", "main", "build SFT / DPO / KTO / verifier rows from trajectory pools; stats"),
    "rollout": ("entropo_trl.rollout.cli", "main", "N rollouts per task into a resumable trajectory pool"),
    "train": ("entropo_trl.train", "main", "train a stage (sft, edpo, ekto, verifier) from its recipe YAML"),
    "merge": ("entropo_trl.train", "merge_main", "merge a LoRA adapter into its base model"),
    "select": ("entropo_trl.evaluation.cli", "select_main", "pick one trajectory per instance (hybrid selector)"),
    "swebench": ("entropo_trl.evaluation.cli", "swebench_main", "SWE-bench predictions and the official harness"),
    "report": ("entropo_trl.evaluation.report", "main", "resolve rate vs N, α sweep, ablation and diversity report"),
    "experiment": ("entropo_trl.experiment", "main", "one α point end to end: train, merge, roll out, select, log"),
    "demo": ("entropo_trl.demo", "main", "the whole pipeline on a CPU with tiny models and toy tasks"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return (
        "usage: entropo COMMAND [ARGS...]\n\nEntroPO for coding agents: data, rollouts, training and evaluation.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n`entropo COMMAND --help` describes a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"entropo-trl {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"entropo: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    result = getattr(importlib.import_module(module), function)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
