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


def load_program(path: str, kind: str):
    import torch
    if kind == "torch.export":
        return torch.export.load(path).module()
    return torch.jit.load(path, map_location="cpu").eval()


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
        lat, joules = [], []
        for _ in range(repeats):
            sync()
            if counter:
                counter.begin()
            t = time.perf_counter()
            for _ in range(iters):
                fn(x)
            sync()
            dt = time.perf_counter() - t
            e = counter.end() - idle_w * dt if counter else watts * dt
            lat.append(dt / iters)
            joules.append(e / iters / x.shape[0])
    return {"latency_s": statistics.median(lat), "joules": max(statistics.median(joules), 1e-15),
            "iterations": iters, "windows_latency_s": lat, "windows_joules": joules}


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
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as e:
        raise RunnerError(f"no bundle manifest at {mpath} ({e.strerror or e}); give --bundle DIR") from None
    except ValueError as e:
        raise RunnerError(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("items"), list):
        raise RunnerError(f"{mpath} is not a format-{FORMAT} bundle manifest")
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
            raise RunnerError(f"cannot load {path} with torch {torch.__version__} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); export with --program "
                              f"torchscript for an older torch") from None
        if args.device == "cuda":
            fn = fn.to("cuda")
        x = torch.randn([int(v) for v in it["input_shape"]]).to(args.device)
        r = measure_item(fn, x, counter, idle_w, args.watts, args.window_s, args.repeats, args.warmup_s, sync)
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


if __name__ == "__main__":
    sys.exit(main())
