"""The estimator is a library that knows `torch.nn` layers, not the project: copied alone out of the repo it imports,
runs its standalone commands, and refuses (one line, exit 2) the commands that need the project's networks."""
import ast
import os
import shutil
import subprocess
import sys

from conftest import ROOT

PKG = "dl_energy_estimator"

IMPORT_ALL = f"""
import importlib, os, pkgutil, sys
import {PKG} as pkg
assert os.path.dirname(os.path.dirname(os.path.abspath(pkg.__file__))) == os.getcwd(), pkg.__file__
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if m.name != pkg.__name__ + ".__main__":  # runs the CLI; `python -m` below runs it
        importlib.import_module(m.name)
root, project = sys.argv[1], set(sys.argv[2].split(","))
files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
assert not [f for f in files if os.path.abspath(f).startswith(root + os.sep)], "a module from the repo was loaded"
assert not project & set(sys.modules), project & set(sys.modules)
pkg.EnergyEstimator.default().save("model.json")
"""


def repo_top_level_names() -> set:
    """The repo's top-level modules and packages (read from the tree, so it holds as files move)."""
    names = set()
    for f in os.listdir(ROOT):
        path = os.path.join(ROOT, f)
        if f.endswith(".py"):
            names.add(f[:-3])
        elif os.path.isdir(path) and any(g.endswith(".py") for g in os.listdir(path)):
            names.add(f)
    return names - {PKG}


def imported_top_levels(source: str) -> set:
    """Top-level names a module imports: import / from (absolute), and by name (importlib.import_module, __import__)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                out.add(node.args[0].value.split(".")[0])
    return out


def test_no_module_of_the_package_names_a_module_of_the_repo():
    project = repo_top_level_names()
    assert {"energy", "train_search"} & project  # the listing sees the repo (an empty one would pass anything)
    some = sorted(project)[0]
    assert imported_top_levels(f"import importlib\nimportlib.import_module('{some}.x')\nfrom {some} import y") \
        == {"importlib", some}  # ... and the detector sees imports by name
    pkg = os.path.join(ROOT, PKG)
    for f in sorted(os.listdir(pkg)):
        if f.endswith(".py"):
            found = imported_top_levels(open(os.path.join(pkg, f), encoding="utf-8").read()) & project
            assert not found, f"{PKG}/{f} imports the project's {sorted(found)}"


def test_the_package_alone_imports_and_runs_its_standalone_commands(tmp_path):
    shutil.copytree(os.path.join(ROOT, PKG), tmp_path / PKG, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)

    res = run("-c", IMPORT_ALL, ROOT, ",".join(sorted(repo_top_level_names())))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run("-m", PKG, "report", "model.json")
    assert res.returncode == 0 and "energy model" in res.stdout and "sha256" in res.stdout, res.stderr[-3000:]
    res = run("-m", PKG, "export", "--out", "bundle", "--arch", "DARTS_V2", "--no_progress")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "network builder" in lines[0] and "python energy.py export" in lines[0]
    assert not (tmp_path / "bundle").exists()


def test_fit_table_without_a_network_builder_is_one_line(tmp_path, capsys):
    from dl_energy_estimator.cli import main
    table = tmp_path / "t.csv"
    table.write_text("genotype,energy_mj\nDARTS_V2,1.0\n")
    capsys.readouterr()
    assert main(["fit", "--table", str(table), "--column", "energy_mj", "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "network builder" in err[0] and "python energy.py fit" in err[0], err
    assert not (tmp_path / "m.json").exists()
