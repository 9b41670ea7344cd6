"""The layout of docs/architecture.md holds in the code: imports flow one way with no
cycle, the checkpoint's keys live in checkpoint.py only, no module grows past ~400 lines,
and `--help` needs no torch."""
import ast
import subprocess
import sys

import pytest

from conftest import REPO

# docs/architecture.md, bottom up: a module may import only modules of a lower layer
LAYERS = [
    {"utils", "choices", "stats", "folders"},
    {"files", "parameter"},
    {"device", "distributed", "spectral", "diffaug", "sampling", "data_loader", "report_html"},
    {"sagan_models", "batches", "inception"},
    {"checkpoint", "plots", "metrics", "gan_step", "runlog"},
    {"run", "features", "runs"},
    {"compare"},
    {"trainer", "sweep", "api"},
    {"slurm"},
    {"main", "fid", "bench"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def package_imports(path):
    """The package's modules that `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYER)


def test_every_module_has_a_layer_and_imports_only_lower_ones():
    modules = {p.stem for p in REPO.glob("*.py")}
    assert modules == set(LAYER), "docs/architecture.md and LAYERS must name every module"
    wrong = [(m, d) for m in modules for d in package_imports(REPO / f"{m}.py") if LAYER[d] >= LAYER[m]]
    assert wrong == []


def test_the_checkpoint_keys_are_named_in_checkpoint_py_only():
    keys = {"G", "D", "G_ema", "g_opt", "d_opt", "rng", "fixed_z", "config", "interval", "elapsed"}
    found = []
    for path in REPO.glob("*.py"):
        if path.name == "checkpoint.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # ck["G"], ck.get("config"): reading a checkpoint's dict by its keys
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in keys:
                found.append(f"{path.name}:{node.lineno} [{node.slice.value!r}]")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys:
                found.append(f"{path.name}:{node.lineno} .get({node.args[0].value!r})")
            if isinstance(node, ast.Constant) and node.value in {"G_ema", "g_opt", "d_opt", "fixed_z"}:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert found == []


def test_no_module_over_about_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in REPO.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 430} == {}


@pytest.mark.parametrize("script", ["main.py", "fid.py"])
def test_help_needs_no_torch(script):
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']; sys.path.insert(0, {str(REPO)!r})\n"
            f"try:\n    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
            f"except SystemExit as e:\n    assert e.code in (0, None)\n"
            f"print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and r.stdout.strip().splitlines()[-1] == "False"
