"""The layout: modules import downward only, and a mistake is answered before TensorFlow loads."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import common

PROJECT = common.PROJECT_DIR
MODULES = sorted(path.stem for path in PROJECT.glob("*.py"))
SCRIPTS = ["proc_mnist.py", "cnn_backwork.py", "preprocess_data.py", "guided_backprop.py"]


def project_imports(module):
    """The project modules a module imports anywhere in it (at the top or inside a function)."""
    tree = ast.parse((PROJECT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES) - {module}


def test_the_project_modules_import_no_circle():
    graph = {module: project_imports(module) for module in MODULES}
    assert len(graph) >= 10 and any(graph.values())  # The walk found the modules and their imports.
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_common_imports_no_other_project_module():
    assert project_imports("common") == set()
    assert project_imports("configurator") == {"common", "datasets"}


# The results format and the datasets are the shared data shapes every other module reads:
# they stand on common alone, so reading a file never pulls in a network or a script.
@pytest.mark.parametrize("module", ["results_format", "datasets"])
def test_the_data_modules_import_only_common(module):
    assert project_imports(module) == {"common"}


def test_no_script_imports_another_script():
    scripts = {Path(script).stem for script in SCRIPTS}
    assert len(scripts) == 4 and all((PROJECT / script).is_file() for script in SCRIPTS)
    for module in MODULES:
        assert not project_imports(module) & scripts, f"{module}.py imports a script: {project_imports(module) & scripts}"


MAX_MODULE_LINES = 800  # A module longer than this holds more than one topic.


@pytest.mark.parametrize("module", MODULES)
def test_no_module_is_longer_than_one_topic(module):
    assert len((PROJECT / f"{module}.py").read_text().splitlines()) <= MAX_MODULE_LINES


def test_the_readme_stays_a_guide():
    assert len((PROJECT / "README.md").read_bytes()) <= 20_000  # The details live in docs/.


def test_the_readme_layout_table_names_every_module():
    readme = (PROJECT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    named = {line.split("`")[1][:-3] for line in table.splitlines() if line.startswith("| `") and ".py`" in line}
    assert named == set(MODULES)


# Runs a script as python would, then says whether TensorFlow (or Keras) was imported.
RUN_AND_REPORT = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # As python SCRIPT puts the script's folder first.
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
print("exit", code, "tensorflow" in sys.modules or "keras" in sys.modules)
"""


def run_reporting(arguments, cwd):
    result = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, *arguments], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    return result.stdout.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_never_imports_tensorflow(script):
    last_line, _ = run_reporting([str(PROJECT / script), "--help"], PROJECT)
    assert last_line == "exit 0 False"


@pytest.mark.parametrize("script, arguments, message", [
    ("proc_mnist.py", ["--set", "train.batch_size=0"], "train.batch_size = 0 must be between 1"),
    ("proc_mnist.py", ["--set", "train.schedule=linear"], "train.schedule 'linear' is unknown"),
    ("proc_mnist.py", ["--set", "defence.eps=1.5"], "defence.eps = 1.5 must be in (0, 1]"),
    ("proc_mnist.py", ["--set", "defence.method=acet", "--set", "train.distribute=mirrored"],
     "defence 'acet' draws its extra batch inside the training step, on one device"),
    ("cnn_backwork.py", ["--model", "missing/model.keras", "--set", "backwork.loss=hinge"], "backwork.loss"),
    ("preprocess_data.py", ["--results", "missing", "--model", "missing/model.keras"], "model missing/model.keras"),
    ("guided_backprop.py", ["--model", "missing/model.keras"], "model missing/model.keras does not exist"),
])
def test_a_config_or_path_mistake_never_imports_tensorflow(tmp_path, script, arguments, message):
    last_line, stderr = run_reporting([str(PROJECT / script), *arguments], tmp_path)
    assert last_line == "exit 2 False" and message in stderr
