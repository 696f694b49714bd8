"""The README and docs/ stay true: their links resolve, the README stays short, its pipeline names real commands,
its Python example runs (with only what a CPU forces swapped), and nothing cites design notes outside the repository."""

import random
import re
from pathlib import Path

import pytest
from helpers import prompt_of, trajectory

from entropo_trl.cli import COMMANDS, main
from entropo_trl.data.trajectory import Trajectory, write_trajectories
from entropo_trl.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and inline code, where links are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces, hyphens kept), spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's `-1`, `-2` suffixes for repeated headings."""
    seen, result = {}, set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text(encoding="utf-8"))) if not t.startswith(EXTERNAL)]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.exists():
            broken.append(f"{link}: no file {file}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{link}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.name}:\n" + "\n".join(broken)


def test_docs_exist_and_readme_links_each_page():
    names = {p.name for p in DOCS}
    for page in ("design", "trainers", "data", "rollouts", "recipes", "evaluation", "benchmarks"):
        assert f"{page}.md" in names
        assert f"docs/{page}.md" in relative_links(README)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move to docs/"
    )


def test_design_sections_the_code_cites_exist():
    for section in ("The losses", "Which tokens count", "Rollouts", "Test-time scaling", "Layout"):
        assert github_slug(section) in anchors(ROOT / "docs" / "design.md"), section


def test_nothing_cites_design_notes_outside_the_repository():
    files = [README, *DOCS, *(p for p in (ROOT / "entropo_trl").rglob("*") if p.suffix in (".py", ".yaml", ".md"))]
    citing = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "../shared" in line or "DESIGN §" in line:
                citing.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not citing, "cite docs/design.md by section name instead:\n" + "\n".join(citing)


def pipeline_commands() -> list[str]:
    """The `entropo COMMAND`s named in the table under the README's "The pipeline" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## The pipeline\n", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    return sorted(set(re.findall(r"\bentropo ([a-z][\w-]*)", table)))


def test_pipeline_table_names_real_commands(capsys):
    commands = pipeline_commands()
    assert {"rollout", "data", "train", "merge", "select", "swebench", "report"} <= set(commands)
    for command in commands:
        assert command in COMMANDS, f"`entropo {command}` in the README's pipeline is not a command"
        try:
            status = main([command, "--help"])
        except SystemExit as exit:
            status = exit.code
        assert status in (0, None), f"`entropo {command} --help` exited {status}"
        assert "usage" in capsys.readouterr().out.lower()


def readme_example() -> str:
    return re.search(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)[1]


def write_pool(path: Path, instances: int = 4) -> None:
    """A small labelled pool: per instance one passing and two failing finished multi-turn trajectories."""
    rng = random.Random(0)
    trajectories = []
    for i in range(instances):
        prompt = prompt_of(rng)
        for reward in (1.0, 0.0, 0.0):
            messages = prompt + trajectory(rng, turns=3)
            trajectories.append(Trajectory(f"repo__issue-{i}", messages, reward, finished=True, source="teacher"))
    write_trajectories(path, trajectories)


def test_readme_python_example_runs(tmp_path, monkeypatch, tokenizer):
    """The README's first Python block, run as written in a folder holding `pool.jsonl` (so its relative paths, the
    pool and `output_dir`, land in tmp_path), with only what a CPU forces swapped: the Hub model for a tiny local one,
    and bf16 off."""
    model_dir = tmp_path / "tiny-model"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_pool(tmp_path / "pool.jsonl")
    code = readme_example()
    for old, new in {
        'model_id = "Qwen/Qwen3-4B-Instruct-2507"': f'model_id = "{model_dir}"',
        "bf16=True": "bf16=False",
    }.items():
        assert code.count(old) == 1, f"the README's example no longer has {old!r} (exactly once)"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["trainer"].state.global_step >= 1
    assert (tmp_path / "ekto" / "adapter_model.safetensors").exists()
