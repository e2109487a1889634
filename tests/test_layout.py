"""The layout: modules import downward only, and a mistake is answered before TensorFlow loads."""
import ast
import subprocess
import sys

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
    assert project_imports("configurator") == {"common"}


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
    ("cnn_backwork.py", ["--model", "missing/model.keras", "--set", "backwork.loss=hinge"], "backwork.loss"),
    ("preprocess_data.py", ["--results", "missing", "--model", "missing/model.keras"], "model missing/model.keras"),
    ("guided_backprop.py", ["--model", "missing/model.keras"], "model missing/model.keras does not exist"),
])
def test_a_config_or_path_mistake_never_imports_tensorflow(tmp_path, script, arguments, message):
    last_line, stderr = run_reporting([str(PROJECT / script), *arguments], tmp_path)
    assert last_line == "exit 2 False" and message in stderr
