"""The code base stays easy to take over: few top-level files (the scripts and the algorithm), imports that flow one
way (scripts -> algorithm and spaces -> plumbing and the estimator; no circle, lazy imports included), an estimator
that imports nothing of the project, loops visible in their scripts, and short functions."""
import ast
import os

from conftest import ROOT

PACKAGES = ("plumbing", "nb201", "dl_energy_estimator")
SCRIPTS = ("train_search", "train", "pareto", "visualize", "energy")
MAX_TOP_LEVEL = 12
MAX_FUNCTION_LINES = 75  # the longest today: dl_energy_estimator.runner.run (71), derivation.project_to_budget (65)


def project_modules():
    """name -> path of every module of the project (top-level files and its packages)."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for pkg in PACKAGES:
        folder = os.path.join(ROOT, pkg)
        mods[pkg] = os.path.join(folder, "__init__.py")
        mods.update({f"{pkg}.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(folder)
                     if f.endswith(".py") and f != "__init__.py"})
    return mods


def imports_of(name, path, mods):
    """Project modules `name` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    package = name if path.endswith("__init__.py") else (name.rsplit(".", 1)[0] if "." in name else "")
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


def graph():
    mods = project_modules()
    return {n: imports_of(n, p, mods) for n, p in mods.items()}


def find_cycle(g):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def layer(name):
    """0: the estimator; 1: plumbing; 2: the algorithm and the spaces (top-level modules, nb201); 3: scripts."""
    top = name.split(".")[0]
    if top == "dl_energy_estimator":
        return 0
    if top == "plumbing":
        return 1
    return 3 if top in SCRIPTS else 2


def test_no_import_circle():
    g = graph()
    assert "plumbing.runs" in g["plumbing.run"] and "model" in g["nb201.pricing"]  # the reader sees real edges
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle)


def test_imports_flow_one_way():
    """Scripts -> algorithm and spaces -> plumbing -> nothing of the project but the estimator; never upward."""
    g = graph()
    upward = [f"{n} imports {m}" for n, deps in g.items() for m in deps if layer(m) > layer(n)]
    assert not upward, upward
    # a script is never a library of another, but pareto.py dry-parses the flags it passes on to the two it runs
    allowed = {("pareto", "train_search"), ("pareto", "train")}
    scripts = [f"{n} imports {m}" for n, deps in g.items() for m in deps if m in SCRIPTS and (n, m) not in allowed]
    assert not scripts, scripts


def test_the_estimator_imports_nothing_from_the_project():
    for name, deps in graph().items():
        if name.startswith("dl_energy_estimator"):
            assert all(m.startswith("dl_energy_estimator") for m in deps), name


def test_few_top_level_files():
    top = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert len(top) <= MAX_TOP_LEVEL, top
    asked = {"operations.py", "model_search.py", "model.py", "architect.py", "genotypes.py", "train_search.py",
             "train.py"}
    assert asked <= set(top), asked - set(top)  # the files users asked for by name stay at the top


def test_functions_stay_short():
    long = []
    for name, path in project_modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        long += [f"{name}.{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_each_script_shows_its_loop():
    """The epochs and the batches are iterated in the script itself (not in a framework that calls it back)."""
    for script in ("train_search.py", "train.py"):
        tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())
        loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
        names = {ast.unparse(n.target) for n in loops}
        assert "epoch" in names, (script, names)
        inner = [m for n in loops if ast.unparse(n.target) == "epoch" for m in ast.walk(n)
                 if isinstance(m, ast.For) and m is not n]
        assert inner, f"{script}: no loop over batches inside the epoch loop"
