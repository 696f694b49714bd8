import subprocess
import sys
from pathlib import Path

import pytest

from entropo_trl.data.trajectory import write_trajectories
from entropo_trl.testing import synthetic_pool

ROOT = Path(__file__).resolve().parents[1]


def test_report_builds_with_non_empty_figures(tmp_path):
    paths = []
    for k, alpha in enumerate(("0.10", "0.11", "0.13")):
        pool = synthetic_pool(instances=12, per_instance=8, seed=k)
        path = tmp_path / f"pool_{alpha}.jsonl"
        write_trajectories(path, [t for group in pool.values() for t in group])
        paths += ["--pool", f"alpha={alpha}:{path}"]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval" / "report.py"),
            *paths,
            "--output",
            str(tmp_path / "report"),
            "--draws",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    for figure in ("best_of_n.png", "alpha_sweep.png", "selector_ablation.png", "diversity.png"):
        data = (tmp_path / "report" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, figure
        assert f"]({figure})" in report
    assert "| without verifier |" in report and "| inst-0 | 8 |" in report
    assert report.count("| alpha=") >= 6  # curves table and diversity table, one row per pool each

    def row(name):
        line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        return [float(cell) for cell in line.strip("|").split("|")[1:] if " - " not in cell and cell.strip()]

    oracle, hybrid = row("alpha=0.10 (oracle)"), row("alpha=0.10")
    assert len(oracle) == len(hybrid) == 8
    assert all(b >= a - 0.02 for a, b in zip(oracle, oracle[1:]))  # best-of-N with the oracle never gets worse
    assert all(o >= h - 0.02 for o, h in zip(oracle, hybrid))  # and no selector beats it
    first = synthetic_pool(instances=12, per_instance=8, seed=0)
    solvable = sum(any(t.passed for t in group) for group in first.values()) / len(first)
    assert oracle[-1] == pytest.approx(solvable, abs=1e-3)  # N = all rollouts: pass@8, exactly
    ablation = [row(name)[0] for name in ("full", "without finished", "without regression", "without verifier")]
    assert len(set(ablation)) > 1  # each ablation runs its own selector


def test_select_cli_writes_one_choice_per_instance(tmp_path):
    from test_selection import candidates

    from entropo_trl.data.readers import read_trajectories

    write_trajectories(tmp_path / "pool.jsonl", candidates())
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval" / "select.py"),
            "--pool",
            str(tmp_path / "pool.jsonl"),
            "--output",
            str(tmp_path / "sel.jsonl"),
            "--preset",
            "authors-verified",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [chosen] = list(read_trajectories(tmp_path / "sel.jsonl"))
    assert chosen.num_steps == 6 and "fell back: {'verifier': 1}" in result.stdout
    rerun = subprocess.run(result.args, capture_output=True, text=True, timeout=120)
    assert (
        rerun.returncode == 0 and len(list(read_trajectories(tmp_path / "sel.jsonl"))) == 1
    )  # replaced, not appended
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval" / "select.py"),
            "--pool",
            str(tmp_path / "pool.jsonl"),
            "--output",
            str(tmp_path / "sel2.jsonl"),
            "--drop_stage",
            "finished",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and list(read_trajectories(tmp_path / "sel2.jsonl"))[0].num_steps == 3


def test_figures_mark_only_measured_n_and_alpha(tmp_path, monkeypatch):
    """The best-of-N axis shows whole N (1.5 rollouts is no setting), the alpha axis the trained alphas only."""
    from matplotlib.figure import Figure

    from entropo_trl.evaluation import report

    ticks, savefig = {}, Figure.savefig

    def spy(self, path, *args, **kwargs):
        ticks[Path(path).name] = [float(t) for t in self.axes[0].get_xticks()]
        return savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    pools = {f"alpha={a}": synthetic_pool(instances=6, per_instance=3, seed=k) for k, a in enumerate(("0.1", "0.13"))}
    report.build_report(pools, tmp_path, draws=50)
    assert ticks["best_of_n.png"] == [1.0, 2.0, 3.0]
    assert ticks["alpha_sweep.png"] == [0.1, 0.13]
