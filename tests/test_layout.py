"""The house's shape: one `entropo` command whose subcommands all answer `--help`, the old script paths, the size
limits of the package's functions and modules, no `sys.path` edits, a light `import entropo_trl`, and recipe YAMLs
that ship inside the wheel."""

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from entropo_trl.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "entropo_trl"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 500
SYS_PATH_EDIT = re.compile(r"sys\.path(\.(insert|append|extend|pop|remove)\b|\s*\[[^\]]*\]\s*=|\s*\+?=)")


def run(*argv, cwd=ROOT, env=None, timeout=180):
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_entropo_lists_every_command():
    result = run(sys.executable, "-m", "entropo_trl", "--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in result.stdout
    unknown = run(sys.executable, "-m", "entropo_trl", "fly")
    assert unknown.returncode == 2 and "unknown command 'fly'" in unknown.stderr


@pytest.mark.parametrize("command", [*COMMANDS, "train ekto"])
def test_every_subcommand_answers_help(command):
    result = run(sys.executable, "-m", "entropo_trl", *command.split(), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout.lower()


def test_the_installed_console_script_is_entropo():
    script = Path(sys.executable).parent / "entropo"
    if not script.exists():
        pytest.skip("the package is not installed with its console scripts in this environment")
    result = run(str(script), "data", "--help")
    assert result.returncode == 0 and "entropo data" in result.stdout


@pytest.mark.parametrize(
    "script, expected",
    [
        ("recipes/ekto.py", "--alpha"),
        ("recipes/experiment.py", "--train_config"),
        ("eval/select.py", "--preset"),
        ("eval/report.py", "--pool"),
        ("eval/swebench_eval.py", "--predictions"),
        ("data_prep/build_kto.py", "--input"),
    ],
)
def test_the_old_script_paths_still_work(script, expected):
    """`python eval/select.py` runs with eval/ first on the module path, where its name would shadow the standard
    library's `select`: the script hands over to the package before anything imports it, from the checkout's root
    and from inside the script's own folder."""
    result = run(sys.executable, script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    inside = run(sys.executable, Path(script).name, "--help", cwd=ROOT / Path(script).parent)
    assert inside.returncode == 0 and expected in inside.stdout, inside.stderr[-2000:]


def test_scripts_are_thin_and_nothing_edits_sys_path():
    for folder in ("recipes", "eval", "data_prep"):
        for script in sorted((ROOT / folder).glob("*.py")):
            code = [line for line in script.read_text().splitlines() if line.strip()]
            assert len(code) <= 15, f"{script.relative_to(ROOT)}: {len(code)} lines, scripts call a package main"
    offenders = []
    for folder in ("entropo_trl", "recipes", "eval", "data_prep", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if path.name == Path(__file__).name:
                continue
            if SYS_PATH_EDIT.search(text):
                offenders.append(f"{path.relative_to(ROOT)} (edits sys.path)")
            if "spec_from_file_location" in text:
                offenders.append(f"{path.relative_to(ROOT)} (loads a file by path)")
    assert not offenders


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_over_80_lines_and_no_module_over_500():
    long_functions, long_modules = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in _functions(ast.parse(source)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def test_import_is_light_and_public_names_load_lazily():
    code = (
        "import sys, entropo_trl\n"
        "heavy = ('aiohttp', 'matplotlib', 'torch', 'trl', 'entropo_trl.rollout')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
        "from entropo_trl import Trajectory, HybridSelector, build_kto_rows, pass_at_k\n"
        "print(','.join(m for m in ('aiohttp', 'matplotlib', 'entropo_trl.rollout') if m in sys.modules))\n"
        "print(sorted(set(entropo_trl.__all__) - set(dir(entropo_trl))))\n"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    loaded_at_import, loaded_by_data_names, missing = result.stdout.splitlines()
    assert loaded_at_import == "" and loaded_by_data_names == "" and missing == "[]"


def test_recipe_yamls_ship_in_the_wheel_and_model_finds_them_there(tmp_path):
    """`--model` picks the recipe through `importlib.resources`: from an installed wheel, outside any checkout."""
    source = tmp_path / "source"  # a copy: setuptools builds in the source folder (build/), not in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "entropo_trl", ignore=shutil.ignore_patterns("__pycache__"))
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(source),
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-500:]}")
    [wheel] = tmp_path.glob("entropo_trl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name for name in names if name.startswith("entropo_trl/recipes/") and name.endswith(".yaml")}
    in_checkout = {f"entropo_trl/{p.relative_to(PACKAGE)}" for p in (PACKAGE / "recipes").glob("*/*.yaml")}
    assert shipped == in_checkout and "entropo_trl/recipes/qwen3-coder-30b-a3b-instruct/ekto.yaml" in shipped
    site = tmp_path / "site"
    installed = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel))
    assert installed.returncode == 0, installed.stderr
    code = (
        "import entropo_trl, entropo_trl.train as t\n"
        "print(entropo_trl.__file__)\n"
        "print(t.recipe_config('Qwen/Qwen3-Coder-30B-A3B-Instruct', 'ekto'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = run(sys.executable, "-c", code, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    package_file, recipe = result.stdout.splitlines()
    assert package_file.startswith(str(site)) and recipe.startswith(str(site))
    assert Path(recipe).read_text() == (PACKAGE / "recipes" / "qwen3-coder-30b-a3b-instruct" / "ekto.yaml").read_text()
