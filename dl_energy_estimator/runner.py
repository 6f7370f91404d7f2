"""Measure every program of a dl_energy_estimator bundle on this device; writes measurements.json.

Standalone: the Python standard library and torch, nothing else (export copies this file into the bundle as
run.py). Programs are ``torch.export`` files (.pt2) or TorchScript files (.pt), as the bundle's manifest says.

    python run.py --watts 7.5                                   # energy = median latency x the power you state
    python run.py --energy_file /sys/class/powercap/intel-rapl:0/energy_uj            # a cumulative counter (uJ)
    python run.py --device cuda --power_file /sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0/in_power0_input \\
        --power_scale 1e-3                                      # a power rail in mW, sampled and integrated

Each program runs on a fixed random input of its shape: a warm-up, then --repeats windows of at least
--window_s seconds; per window latency = time / iterations and energy = (counter difference - idle power x time)
/ iterations / batch. The medians go to measurements.json beside the traced features of each program, ready for
``python -m dl_energy_estimator fit measurements.json --out energy_model.json`` (on any machine).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

FORMAT = 1


class RunnerError(Exception):
    """Bad input or an unusable counter: one line, exit status 2."""


def positive_number(s: str) -> float:
    """argparse type: a finite number > 0 (the package's CLI uses it too)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s!r}")
    return v


#: files that mark a run folder of the project (train_search.py, train.py, pareto.py): its files belong to its run
RUN_FOLDER_MARKERS = (".lock", "args.json", "checkpoint.pt")


def output_file_problem(path: str | None, flag: str, force: bool = False, inputs=()) -> str | None:
    """Why `path` may not be written as the output file of `flag`, or None: it must not be empty or a folder,
    its folder must exist and not be a run folder (whose files belong to that run), it must not be one of the
    command's `inputs`, and an existing file is overwritten only with `force`. The project's scripts and the
    package's CLI check their outputs with it too (this file stays standalone: the rest may import it)."""
    if path is None or not str(path).strip():
        return f"{flag} is empty; name the file to write"
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; name a file to write"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: the folder {folder} does not exist; create it first"
    marker = next((m for m in RUN_FOLDER_MARKERS if os.path.exists(os.path.join(folder, m))), None)
    if marker:
        return (f"{flag} {path} is inside the run folder {folder} (it holds {marker}), whose files belong to its "
                f"run; write it elsewhere")
    same = [i for i in inputs if i and os.path.exists(i) and os.path.exists(path) and os.path.samefile(i, path)]
    if same:
        return f"{flag} {path} is also this command's input; write the output to another file"
    if os.path.lexists(path) and not force:
        return f"{flag} {path} already exists; choose a new name, or add --force to overwrite it"
    if not os.access(folder, os.W_OK):
        return f"{flag} {path}: the folder {folder} is not writable"
    return None


def _read_number(path: str) -> float:
    try:
        with open(path) as f:
            text = f.read(256).strip()
    except OSError as e:
        raise RunnerError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        v = float(text.split()[0])
    except (ValueError, IndexError):
        raise RunnerError(f"{path} does not hold a number (read {text[:40]!r})") from None
    if not math.isfinite(v):
        raise RunnerError(f"{path} holds {text[:40]!r}, not a finite number")
    return v


class CounterFile:
    """A cumulative energy counter in a text file (RAPL's energy_uj, ...), ``scale`` joules per unit; wrap-around
    at ``wrap`` units (RAPL's max_energy_range_uj, read from beside the file when not given)."""

    def __init__(self, path: str, scale: float, wrap: float | None):
        self.path, self.scale = path, scale
        sibling = os.path.join(os.path.dirname(path), "max_energy_range_uj")
        if wrap is None and os.path.basename(path) == "energy_uj" and os.path.exists(sibling):
            wrap = _read_number(sibling)
        self.wrap = wrap
        self.start = _read_number(path)

    def begin(self) -> None:
        self.start = _read_number(self.path)

    def end(self) -> float:
        v = _read_number(self.path)
        d = v - self.start
        if d < 0:
            if not self.wrap:
                raise RunnerError(f"{self.path} went backwards ({self.start} -> {v}); give --max_energy if it wraps")
            d += self.wrap + 1
        return d * self.scale


class PowerFile:
    """Instantaneous power in a text file (a Jetson INA3221 rail, hwmon power1_input, ...), ``scale`` watts per
    unit, sampled every ``period`` seconds in a thread and integrated (trapezoids) over each window."""

    def __init__(self, path: str, scale: float, period: float):
        self.path, self.scale, self.period = path, scale, period
        _read_number(path)
        self.samples: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.thread = None

    def _poll(self) -> None:
        while not self.stop.is_set():
            try:
                p = _read_number(self.path) * self.scale
            except RunnerError as e:
                self.error = e
                return
            with self.lock:
                self.samples.append((time.perf_counter(), p))
            self.stop.wait(self.period)

    def begin(self) -> None:
        self.stop.clear()
        self.samples = []
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def end(self) -> float:
        self.stop.set()
        self.thread.join()
        if self.error:
            raise self.error
        s = self.samples
        if len(s) < 2:
            return s[0][1] * self.period if s else 0.0
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(s, s[1:]))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MAX_MANIFEST_BYTES = 64 << 20
MAX_BATCH = 2 ** 20  # a deployment batch beyond a million samples is a damaged manifest
MAX_DIM = 1 << 16


def read_manifest(mpath: str) -> dict:
    """The bundle's manifest.json, checked: a format-1 object whose items each name a program file and a
    positive input shape (batch first), and a positive batch size; every problem one RunnerError line."""
    try:
        if os.path.exists(mpath) and not os.path.isfile(mpath):
            raise RunnerError(f"{mpath} is not a regular file: not a bundle manifest")
        with open(mpath, encoding="utf-8") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            raise RunnerError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a bundle manifest")
        manifest = json.loads(text, parse_constant=_no_constant)
    except OSError as e:
        raise RunnerError(f"no bundle manifest at {mpath} ({e.strerror or e}); give --bundle DIR") from None
    except RecursionError:
        raise RunnerError(f"{mpath} is nested too deeply to be a bundle manifest") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunnerError(f"{mpath} is not valid JSON ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("items"), list):
        raise RunnerError(f"{mpath} is not a format-{FORMAT} bundle manifest")
    batch = manifest.get("batch_size", 1)
    if not _count(batch, 1, MAX_BATCH):
        raise RunnerError(f"{mpath}: batch_size {str(batch)[:40]} is not an integer in [1, {MAX_BATCH}]")
    if manifest.get("program", "torch.export") not in ("torch.export", "torchscript"):
        raise RunnerError(f"{mpath}: unknown program format {str(manifest.get('program'))[:40]!r}")
    for i, it in enumerate(manifest["items"]):
        shape = it.get("input_shape") if isinstance(it, dict) else None
        if not isinstance(it, dict) or not isinstance(it.get("file"), str) or not it["file"]:
            raise RunnerError(f"{mpath}: items[{i}] does not name its program 'file'")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(_count(v, 1, MAX_DIM) for v in shape)
                and _count(shape[0], 1, MAX_BATCH)):
            raise RunnerError(f"{mpath}: items[{i}].input_shape {str(shape)[:60]} is not a list of positive sizes")
        if os.path.isabs(it["file"]) or ".." in it["file"].replace("\\", "/").split("/"):
            raise RunnerError(f"{mpath}: items[{i}].file {it['file'][:60]!r} is not a path inside the bundle")
    return manifest


def _count(v, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_program(path: str, kind: str):
    """A program of the bundle, loaded with whatever torch prints on a damaged file kept off the terminal: the
    caller's one line says what is wrong."""
    import contextlib
    import io
    import logging
    import warnings
    import torch
    quiet = logging.getLogger("torch")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # torch.export logs a traceback of its own before raising
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if kind == "torch.export":
                return torch.export.load(path).module()
            return torch.jit.load(path, map_location="cpu").eval()
    finally:
        quiet.setLevel(level)


def measure_item(fn, x, counter, idle_w: float, watts: float | None, window_s: float, repeats: int,
                 warmup_s: float, sync) -> dict:
    """Median latency (s per forward) and energy (J per sample) of ``fn(x)``: a warm-up of at least 3 calls and
    ``warmup_s``, then ``repeats`` windows of at least ``window_s``; energy from ``counter`` (begin/end, joules,
    less ``idle_w`` x time) or latency x ``watts``. ``measure.measure`` uses it too."""
    import torch
    with torch.no_grad():
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < warmup_s:
            fn(x)
            sync()
            n += 1
        per = (time.perf_counter() - t0) / n
        iters = max(1, math.ceil(window_s / max(per, 1e-7)))
        lat, joules, raw = [], [], []
        for _ in range(repeats):
            sync()
            if counter:
                counter.begin()
            t = time.perf_counter()
            for _ in range(iters):
                fn(x)
            sync()
            dt = time.perf_counter() - t
            raw.append(counter.end() if counter else watts * dt)
            e = raw[-1] - idle_w * dt if counter else raw[-1]
            lat.append(dt / iters)
            joules.append(e / iters / x.shape[0])
    return {"latency_s": statistics.median(lat), "joules": statistics.median(joules), "iterations": iters,
            "windows_latency_s": lat, "windows_joules": joules, "windows_counter_j": raw}


MAX_JOULES_PER_SAMPLE = 1e4  # 10 kJ for one forward pass of one sample: a counter in the wrong unit, not a network


def energy_problem(r: dict, name: str, counter_name: str) -> str | None:
    """Why a `measure_item` result is no measurement, or None: a counter that did not move in any window, an
    energy not above the idle power, or one absurdly large (a wrong --energy_scale)."""
    if all(c == 0 for c in r["windows_counter_j"]):
        return (f"{name}: the energy counter {counter_name} did not change in any of {len(r['windows_counter_j'])} "
                f"windows; it is not a live counter (or updates less often than each window): check the file, or "
                f"raise --window_s")
    if not math.isfinite(r["joules"]) or r["joules"] <= 0:
        return (f"{name}: the measured energy ({r['joules']:.3g} J per sample) is not above the idle power; raise "
                f"--window_s so the work outweighs the counter's noise, or measure without idle subtraction "
                f"(--idle_s 0)")
    if r["joules"] > MAX_JOULES_PER_SAMPLE:
        return (f"{name}: {r['joules']:.3g} J per sample is absurd (more than {MAX_JOULES_PER_SAMPLE:g} J); check "
                f"the counter's unit (--energy_scale / --power_scale)")
    return None


def write_text_atomic(path: str, text: str) -> None:
    """Atomic: a temp file in the same folder, fsync, os.replace (never a half-written file). The package's
    schema.write_atomic uses it too: this file must stay standalone, the rest of the package may import it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    import torch
    bundle = args.bundle or os.path.dirname(os.path.abspath(__file__))
    mpath = os.path.join(bundle, "manifest.json")
    manifest = read_manifest(mpath)
    programs = [os.path.join(bundle, str(it.get("file", ""))) for it in manifest["items"]]
    problem = output_file_problem(args.out, "--out", args.force, [mpath, *programs])  # before minutes of measuring
    if problem:
        raise RunnerError(problem)
    items = manifest["items"]
    if args.only:
        names = set(args.only.split(","))
        items = [it for it in items if it.get("name") in names]
        if not items:
            raise RunnerError(f"--only {args.only} matches no item of the bundle")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RunnerError("--device cuda but CUDA is not available")
    if args.energy_file:
        counter, source = CounterFile(args.energy_file, args.energy_scale, args.max_energy), "counter_file"
    elif args.power_file:
        counter, source = PowerFile(args.power_file, args.power_scale, args.sample_s), "power_file"
    elif args.watts:
        counter, source = None, "latency_x_watts"
    else:
        raise RunnerError("say how to get energy: --energy_file PATH, --power_file PATH or --watts W")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    idle_w = 0.0
    if counter and args.idle_s > 0:
        counter.begin()
        t = time.perf_counter()
        time.sleep(args.idle_s)
        idle_w = max(0.0, counter.end() / (time.perf_counter() - t))
    out_items = []
    for i, it in enumerate(items):
        path = os.path.join(bundle, str(it.get("file", "")))
        try:
            fn = load_program(path, manifest.get("program", "torch.export"))
        except Exception as e:  # noqa: BLE001 - any unloadable program is reported the same way
            import zipfile
            if not os.path.isfile(path) or not zipfile.is_zipfile(path):  # both program formats are zip archives
                raise RunnerError(f"program {path} of items[{i}] is missing or damaged (not an archive torch "
                                  f"writes); copy or export the bundle again") from None
            text = str(e).split("Please check the warnings")[0].strip().splitlines()
            raise RunnerError(f"cannot load {path} with torch {torch.__version__} ({type(e).__name__}: "
                              f"{text[0][:160] if text else ''}); export with --program torchscript for an older "
                              f"torch") from None
        if args.device == "cuda":
            fn = fn.to("cuda")
        x = torch.randn([int(v) for v in it["input_shape"]]).to(args.device)
        r = measure_item(fn, x, counter, idle_w, args.watts, args.window_s, args.repeats, args.warmup_s, sync)
        problem = energy_problem(r, f"item {it.get('name', i)}", args.energy_file or args.power_file or "--watts")
        if problem:
            raise RunnerError(problem)
        out_items.append({**{k: it[k] for k in ("name", "kind", "family", "input_shape", "features") if k in it}, **r})
        print(f"[{i + 1}/{len(items)}] {it.get('name')}: {1e3 * r['latency_s']:.3f} ms, "
              f"{1e3 * r['joules']:.4f} mJ per sample", flush=True)
        del fn, x
    dev = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    doc = {"format": FORMAT, "kind": "measurements", "batch_size": manifest.get("batch_size", 1),
           "dtype": manifest.get("dtype", "float32"), "source": source,
           "device": {"name": args.device_name or dev, "platform": platform.platform(), "torch": torch.__version__,
                      "python": platform.python_version(), "threads": args.threads, "device": args.device},
           "settings": {"watts": args.watts, "energy_file": args.energy_file, "power_file": args.power_file,
                        "idle_w": idle_w, "window_s": args.window_s, "repeats": args.repeats},
           "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
           "items": out_items}
    write_text_atomic(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({len(out_items)} items, {source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle folder (default: the folder of this script)")
    p.add_argument("--out", default="measurements.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--device_name", default=None, help="name recorded for the device (default: from torch)")
    e = p.add_mutually_exclusive_group()
    e.add_argument("--watts", type=positive_number, default=None, help="power while busy (W): energy = latency x watts")
    e.add_argument("--energy_file", default=None, help="cumulative energy counter file (e.g. RAPL energy_uj)")
    e.add_argument("--power_file", default=None, help="instantaneous power file (e.g. a Jetson rail)")
    p.add_argument("--energy_scale", type=positive_number, default=1e-6, help="joules per counter unit (default uJ)")
    p.add_argument("--max_energy", type=positive_number, default=None, help="counter value where it wraps to 0")
    p.add_argument("--power_scale", type=positive_number, default=1e-3, help="watts per power-file unit (default mW)")
    p.add_argument("--sample_s", type=positive_number, default=0.005, help="power-file sampling period (s)")
    p.add_argument("--idle_s", type=float, default=2.0, help="idle power measured this long first (0: none)")
    p.add_argument("--window_s", type=positive_number, default=0.5, help="each measurement window lasts at least this")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup_s", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable batch-1 latency)")
    p.add_argument("--only", default=None, help="comma-separated item names to measure")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.idle_s < 0:
        p.error("--repeats and --threads must be >= 1, --idle_s >= 0")
    try:
        return run(args)
    except RunnerError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"run.py: error: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
