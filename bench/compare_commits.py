"""Same-machine before/after check for refactors: run the golden configuration (a digits search, seed 0, 3 epochs,
2 threads, then the training of its cell) from two commits and compare what they write, floats exactly.

    python bench/compare_commits.py [OLD] [NEW] [--keep]

OLD defaults to the merge-base of HEAD and main (HEAD~1 on main itself); NEW defaults to the working tree as it is
(uncommitted and untracked files included). A commit runs from a temporary `git worktree`, removed afterwards. The
scripts are started as `python train_search.py ...` / `python train.py ...` from each tree, so nothing here imports
the project: modules may move between packages. Exit status 0 when every file is identical (wall-clock fields
aside), 1 on any difference, 2 when a run fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKING = "working"  # NEW's name for the working tree
WALL_CLOCK = {"epoch_s", "wall_s"}
FILES = ["search/metrics.jsonl", "search/genotype.json", "search/alphas.json", "train/metrics.jsonl",
         "train/summary.json"]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout.strip()


def default_old() -> str:
    """The merge-base with main, or HEAD~1 when HEAD is on main (the merge-base is then HEAD itself)."""
    try:
        base = git("merge-base", "HEAD", "main")
    except subprocess.CalledProcessError:
        return "HEAD~1"
    return "HEAD~1" if base == git("rev-parse", "HEAD") else base


def golden_run(tree: str, out: str, epochs: int, threads: int) -> Optional[str]:
    """Search then train from `tree`, writing under `out`; None, or the failing command's last stderr lines."""
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONPATH=tree)
    common = ["--dataset", "digits", "--seed", "0", "--epochs", str(epochs), "--log_dir", out, "--wandb", "disabled"]
    commands = [["train_search.py", *common, "--run_name", "search", "--threads", str(threads)],
                ["train.py", *common, "--run_name", "train", "--genotype", os.path.join(out, "search", "genotype.json")]]
    for command in commands:
        r = subprocess.run([sys.executable, *command], cwd=tree, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return f"{command[0]} in {tree} exited {r.returncode}: " + "\n".join(r.stderr.splitlines()[-5:])
    return None


def load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def first_difference(a: Any, b: Any, where: str = "") -> Tuple[int, int, Optional[str]]:
    """(leaf values compared, how many differ, the first difference or None): types and values exactly equal (NaN
    equals NaN), wall-clock keys left out; a dict's keys or a list's length that differ end the walk there."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a, keys_b = set(a) - WALL_CLOCK, set(b) - WALL_CLOCK
        if keys_a != keys_b:
            return 0, 1, f"{where or '.'}: keys {sorted(keys_a ^ keys_b)} in one only"
        pairs = [(a[k], b[k], f"{where}.{k}") for k in sorted(keys_a)]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 0, 1, f"{where or '.'}: {len(a)} vs {len(b)} items"
        pairs = [(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    else:
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        same = type(a) is type(b) and (a == b or both_nan)
        return 1, 0 if same else 1, None if same else f"{where or '.'}: {a!r} vs {b!r}"
    compared, differing, first = 0, 0, None
    for x, y, w in pairs:
        n, d, diff = first_difference(x, y, w)
        compared, differing, first = compared + n, differing + d, first or diff
    return compared, differing, first


def compare(old_out: str, new_out: str) -> List[Tuple[str, str, bool, str]]:
    """One row per file: (file, rows / values compared and how many differ, identical, first difference)."""
    rows = []
    for name in FILES:
        paths = [os.path.join(old_out, name), os.path.join(new_out, name)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            rows.append((name, "-", False, f"missing: {', '.join(missing)}"))
            continue
        a, b = load(paths[0]), load(paths[1])
        n, differing, diff = first_difference(a, b)
        size = f"{len(a)} rows, " if isinstance(a, list) and name.endswith(".jsonl") else ""
        size += f"{n} values" + (f", {differing} differ" if differing else "")
        rows.append((name, size, diff is None, diff or ""))
    return rows


def checkout(commit: str, parent: str) -> str:
    path = os.path.join(parent, "tree-" + commit.replace("/", "_").replace("~", "_").replace("^", "_"))
    git("worktree", "add", "--detach", path, commit)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", nargs="?", default=None, help="commit to compare against (default: merge-base with main)")
    p.add_argument("new", nargs="?", default=WORKING, help=f"commit, or '{WORKING}' for the working tree (default)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="search threads (results are bitwise per thread count)")
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed) instead of removing them")
    args = p.parse_args()
    old = args.old or default_old()
    try:
        labels = [git("rev-parse", "--short", c) for c in [old] + ([] if args.new == WORKING else [args.new])]
    except subprocess.CalledProcessError as e:
        print(f"compare_commits: unknown commit ({e.stderr.strip()}); give commits git can resolve", file=sys.stderr)
        return 2
    labels += [WORKING] if args.new == WORKING else []
    tmp = tempfile.mkdtemp(prefix="compare_commits_")
    trees: List[str] = []
    try:
        outs = []
        for commit, label in zip([old, args.new], labels):
            tree = REPO if commit == WORKING else checkout(commit, tmp)
            trees += [] if tree == REPO else [tree]
            out = os.path.join(tmp, "runs-" + label)
            print(f"running {label} ({tree}) ...", flush=True)
            failure = golden_run(tree, out, args.epochs, args.threads)
            if failure:
                print(f"compare_commits: {failure}", file=sys.stderr)
                return 2
            outs.append(out)
        rows = compare(*outs)
    finally:
        for tree in trees:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
        if args.keep:
            print(f"run folders kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{labels[0]} vs {labels[1]}: digits search, seed 0, {args.epochs} epochs, {args.threads} threads, then "
          f"training of its cell ({', '.join(sorted(WALL_CLOCK))} aside)\n")
    print("| file | compared | identical | first difference |\n|---|---|---|---|")
    for name, size, same, diff in rows:
        print(f"| {name} | {size} | {'yes' if same else 'NO'} | {diff} |")
    return 0 if all(same for _, _, same, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
