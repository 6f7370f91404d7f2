"""Bad input: exit status 2, usage + one error line on stderr, no traceback, no run folder left behind.

Most cases call the scripts' `main()` in this process (imports once: fast); two run as real subprocesses to
show the end-to-end behaviour. A test also greps the sources for eval / pickle / unsafe torch.load."""
import json
import os
import tokenize

import pytest

import train
import train_search
from plumbing import runs
from conftest import ROOT, run_script

SEARCH_TINY = ["--dataset", "digits", "--layers", "3", "--epochs", "1", "--wandb", "disabled"]
TRAIN_TINY = ["--dataset", "digits", "--arch", "DARTS_V2", "--layers", "3", "--init_channels", "8", "--epochs", "1",
              "--wandb", "disabled"]


def _files(tmp):
    """Input files the cases refer to, built in the test's folder."""
    (tmp / "empty").mkdir()
    (tmp / "bad.json").write_text("{not json")
    (tmp / "unknown_op.json").write_text(json.dumps({
        "format": 1, "normal": [["conv_9x9", 0], ["skip_connect", 1]] * 4, "normal_concat": [2, 3, 4, 5],
        "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]] * 4, "reduce_concat": [2, 3, 4, 5]}))
    (tmp / "bad_input.json").write_text(json.dumps({
        "format": 1, "normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 7]] * 4, "normal_concat": [2, 3, 4, 5],
        "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]] * 4, "reduce_concat": [2, 3, 4, 5]}))
    (tmp / "energy_corrupt.json").write_text('{"format": 1, "coeffic')
    (tmp / "energy_v99.json").write_text(json.dumps({"format": 99, "coefficients": {}, "meta": {}, "fit": {}}))
    (tmp / "not_a_ckpt.pt").write_text("hello, I am text")
    (tmp / "a_file").write_text("x")
    runs.save_checkpoint(str(tmp / "train_ckpt.pt"), "train", {"epoch": 0, "args": {}})
    runs.save_checkpoint(str(tmp / "search_ckpt.pt"), "search", {"epoch": 0, "args": {}})
    # A search checkpoint of the `cheap` space with 3 layers: resuming it as another space must fail.
    _, args, _ = train_search.parse_args(SEARCH_TINY + ["--primitives", "cheap", "--log_dir", str(tmp / "other"),
                                                        "--run_name", "cheap"])
    train_search.resolve(args)
    space = {"primitives": list(args.primitives), "layers": args.layers, "init_channels": args.init_channels,
             "partial_channels": args.partial_channels, "dataset": args.dataset}
    os.makedirs(tmp / "other" / "cheap")
    runs.save_checkpoint(str(tmp / "other" / "cheap" / "checkpoint.pt"), "search",
                          {"epoch": 0, "args": vars(args), "space": space})


CASES = [  # (id, script, extra flags, a word the error line must contain)
    ("search-dataset", "search", ["--dataset", "nosuch"], "cifar10"),
    ("train-dataset", "train", ["--dataset", "nosuch"], "cifar10"),
    ("search-primitives", "search", ["--primitives", "sep_conv_3x3,conv_9x9"], "valid"),
    ("search-cifar-offline", "search", ["--dataset", "cifar10", "--data", "{tmp}/empty"], "cifar-10-batches-py"),
    ("train-cifar-offline", "train", ["--dataset", "cifar10", "--data", "{tmp}/empty"], "cifar-10-batches-py"),
    ("train-genotype-json", "train", ["--arch", None, "--genotype", "{tmp}/bad.json"], "JSON"),
    ("train-genotype-op", "train", ["--arch", None, "--genotype", "{tmp}/unknown_op.json"], "conv_9x9"),
    ("train-genotype-input", "train", ["--arch", None, "--genotype", "{tmp}/bad_input.json"], "out of range"),
    ("train-genotype-missing", "train", ["--arch", None, "--genotype", "{tmp}/nosuch.json"], "does not exist"),
    ("search-energy-corrupt", "search", ["--energy_model", "{tmp}/energy_corrupt.json"], "energy_corrupt"),
    ("train-energy-version", "train", ["--energy_model", "{tmp}/energy_v99.json"], "energy_v99"),
    ("search-energy-missing", "search", ["--energy_model", "{tmp}/nosuch.json"], "nosuch"),
    ("search-energy-weight-neg", "search", ["--energy_weight", "-1"], "energy_weight"),
    ("search-energy-weight-nan", "search", ["--energy_weight", "abc"], "energy_weight"),
    ("search-lr-neg", "search", ["--learning_rate", "-0.1"], "learning_rate"),
    ("train-lr-text", "train", ["--learning_rate", "fast"], "learning_rate"),
    ("search-batch-0", "search", ["--batch_size", "0"], "batch_size"),
    ("search-layers-2", "search", ["--layers", "2"], "--layers 2"),
    ("train-batch-0", "train", ["--batch_size", "0"], "batch_size"),
    ("search-cuda", "search", ["--device", "cuda"], "CUDA"),
    ("train-cuda", "train", ["--device", "cuda"], "CUDA"),
    ("search-resume-missing", "search", ["--resume", "{tmp}/nosuch.pt"], "no such"),
    ("train-resume-missing", "train", ["--resume", "{tmp}/empty"], "no such"),
    ("search-resume-text", "search", ["--resume", "{tmp}/not_a_ckpt.pt"], "not a readable checkpoint"),
    ("search-resume-train-ckpt", "search", ["--resume", "{tmp}/train_ckpt.pt"], "not a search checkpoint"),
    ("train-resume-search-ckpt", "train", ["--resume", "{tmp}/search_ckpt.pt"], "not a train checkpoint"),
    ("search-resume-other-layers", "search", ["--resume", "{tmp}/other/cheap", "--layers", "4"], "search space"),
    ("search-resume-other-prims", "search", ["--resume", "{tmp}/other/cheap", "--primitives", "darts"],
     "search space"),
    ("search-log-dir", "search", ["--log_dir", "{tmp}/a_file/sub"], "log_dir"),
    ("train-log-dir", "train", ["--log_dir", "{tmp}/a_file/sub"], "log_dir"),
]


def _argv(script, extra, tmp):
    """The tiny base command with the case's flags; a flag given in the case replaces the base's, and a
    value None drops it (e.g. --arch when the case gives --genotype)."""
    base = list(SEARCH_TINY if script == "search" else TRAIN_TINY)
    pairs = list(zip(extra[::2], extra[1::2]))
    for flag, _ in pairs:
        if flag in base:
            del base[base.index(flag):base.index(flag) + 2]
    tail = [x for flag, value in pairs if value is not None for x in (flag, value.format(tmp=tmp))]
    if "--log_dir" not in extra:
        tail += ["--log_dir", str(tmp / "log")]
    return base + ["--run_name", "r"] + tail


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    _files(tmp)
    return tmp


@pytest.mark.parametrize("name,script,extra,word", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, script, extra, word, inputs, capsys):
    main = train_search.main if script == "search" else train.main
    argv = _argv(script, extra, inputs)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].count("error:") == 1 and word in lines[-1], err
    assert not os.path.exists(inputs / "log" / "r"), "a failed start left a run folder"


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("train_search.py", ["--energy_weight", "-1"]),
                                          ("train.py", ["--dataset", "cifar10", "--data", "EMPTY"])])
def test_bad_input_in_a_real_process(script, extra, tmp_path):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if e == "EMPTY" else e for e in extra]
    base = SEARCH_TINY if script == "train_search.py" else TRAIN_TINY
    res = run_script(script, *base, "--log_dir", str(tmp_path / "log"), *extra, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.strip().splitlines()[-1].count("error:") == 1
    assert not os.path.exists(tmp_path / "log") or not os.listdir(tmp_path / "log")


def _code_tokens(path):
    """(name, previous token, next token, line) for each NAME token: code only, not strings or comments."""
    with open(path, "rb") as f:
        toks = [t for t in tokenize.tokenize(f.readline)
                if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                  tokenize.DEDENT, tokenize.STRING)]
    for i, t in enumerate(toks):
        if t.type == tokenize.NAME:
            yield t.string, toks[i - 1].string if i else "", toks[i + 1].string if i + 1 < len(toks) else "", t.line


def test_no_eval_pickle_or_unsafe_load_in_sources():
    bad = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in ("tests", "log", "data", "wandb", "__pycache__")
                   and not d.startswith(".")]
        for f in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, f)
            for name, prev, nxt, line in _code_tokens(path):
                where = f"{os.path.relpath(path, ROOT)}: {line.strip()}"
                if name in ("eval", "exec") and nxt == "(" and prev != ".":
                    bad.append(where)
                elif name in ("pickle", "joblib", "cPickle", "dill"):
                    bad.append(where)
                elif name == "load" and prev == "." and nxt == "(" and "torch.load(" in line \
                        and "weights_only=True" not in line:
                    bad.append(where)
    assert not bad, bad
