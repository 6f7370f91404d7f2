"""The code base stays easy to take over: imports flow one way (no circle, lazy imports included), and the search
script keeps its algorithm short (under 300 lines, no function over 40)."""
import ast
import os

from conftest import ROOT


def project_modules():
    """name -> path of every module of the project (top-level files and the estimator package)."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    pkg = os.path.join(ROOT, "dl_energy_estimator")
    mods.update({f"dl_energy_estimator.{f[:-3]}": os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(".py")})
    return mods


def imports_of(name, path, mods):
    """Project modules `name` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    package = name.rsplit(".", 1)[0] if "." in name else ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside the package
                base = f"{package}.{base}" if base else package
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in mods else base)
    return {m for m in out if m in mods and m != name}


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle():
    mods = project_modules()
    graph = {n: imports_of(n, p, mods) for n, p in mods.items()}
    assert "runs" in graph["runner"] and "utils" in graph["runs"]  # the reader sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_estimator_imports_nothing_from_the_project():
    mods = project_modules()
    for name, path in mods.items():
        if name.startswith("dl_energy_estimator"):
            assert all(m.startswith("dl_energy_estimator") for m in imports_of(name, path, mods)), name


def test_the_search_script_stays_short():
    path = os.path.join(ROOT, "train_search.py")
    source = open(path, encoding="utf-8").read()
    assert len(source.splitlines()) < 300
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 40]
    assert not long, long
