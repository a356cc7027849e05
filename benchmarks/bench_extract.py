"""End-to-end timing and peak memory of ``extract`` for WI-48-768, literal vs fast paths.

Every (scan, mode) runs in a fresh subprocess, so peak memory is measured
cleanly (peak RSS via ``/proc/self/status`` VmHWM, reset before the first
call; ``torch.cuda.max_memory_allocated`` on a GPU) and one mode's caches
cannot help another. Each subprocess builds the same random network (ScaLR
configuration: LayerNorm, ReLU, FOV +-64 m / +-8 m, grids 256x256, 256x32,
256x32), synthesises the same deterministic scan, runs ``extract`` once to
warm up (the fast engine is built there) and then ``--repeats`` timed times.
The timed call is the whole of ``extract``: input checks, preprocessing
(voxelisation, FOV crop, cells, kNN), the network and the upsampling to
every input point.

The parent prints one table per run with the time of every mode, its
speed-up over the literal implementation on the same device measured in the
same run, peak memory, and the accuracy of every mode against the literal
float32 features (max |error| / RMS, the testvector metric, and per-point
cosine) and of reduced precision against float32.

Modes: ``literal`` (``impl="literal"``, :mod:`scalr_zoo.literal`: the spec
step by step, channel-major ``(1, C, N)`` tokens, kernel-1 convolutions, a
fresh dense grid per spatial mix with scatter mean, two depthwise 3x3 convs
and gather; the baseline of every ratio), ``literal-bf16`` (the same under
bf16 autocast), ``module`` (``impl="module"``: the model's own forward,
point-major tokens but still dense grids), ``fast`` (default fast engine,
float32), ``fast-bf16``, ``fast-fp16``, and their ``cuda-`` variants.
``floor`` / ``floor-bf16`` time only the network's large matrix products
(the embedding's C x C map over the M*K neighbour pairs, its final map and
the two C x C products of every channel mix) for the scan's M kept points,
on random data, with the product routine the fast engine uses (torch, or
for bf16 on CPUs where oneDNN cannot use AMX, scalr_zoo's AMX kernel): it
shows how much of a fast mode's time is left outside the products.

Examples::

    python benchmarks/bench_extract.py                          # everything (2-core CPU: ~40 min)
    python benchmarks/bench_extract.py --scans nuscenes --modes literal,fast --depth 6 --repeats 1
    python benchmarks/bench_extract.py --scan-file ../shared/data/kitti_000008.bin --sensor semantickitti
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

#: mode name -> (device, impl, dtype)
MODES = {
    "literal": ("cpu", "literal", "fp32"),
    "literal-bf16": ("cpu", "literal", "bf16"),
    "module": ("cpu", "module", "fp32"),
    "fast": ("cpu", "fast", "fp32"),
    "fast-bf16": ("cpu", "fast", "bf16"),
    "fast-fp16": ("cpu", "fast", "fp16"),
    "cuda-literal": ("cuda", "literal", "fp32"),
    "cuda-literal-bf16": ("cuda", "literal", "bf16"),
    "cuda-module": ("cuda", "module", "fp32"),
    "cuda-fast": ("cuda", "fast", "fp32"),
    "cuda-fast-bf16": ("cuda", "fast", "bf16"),
    "cuda-fast-fp16": ("cuda", "fast", "fp16"),
    "floor": ("cpu", "floor", "fp32"),
    "floor-bf16": ("cpu", "floor", "bf16"),
    "cuda-floor-bf16": ("cuda", "floor", "bf16"),
}
DEFAULT_MODES = ["literal", "module", "fast", "fast-bf16", "floor", "floor-bf16"]
DEFAULT_CUDA_MODES = ["cuda-literal", "cuda-module", "cuda-fast", "cuda-fast-bf16", "cuda-fast-fp16", "cuda-floor-bf16"]
SCAN_SENSORS = {"nuscenes": "nuscenes", "kitti": "semantickitti"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _load_scan(scan: str, scan_file: str | None) -> np.ndarray:
    if scan_file:
        data = np.fromfile(scan_file, dtype=np.float32)
        return data.reshape(-1, 4)
    from scans import synthetic_scan

    return synthetic_scan(scan)


def worker(args: argparse.Namespace) -> None:
    """Run one (scan, mode) and print a JSON line; save the first run's features."""
    import scalr_zoo  # before any torch op: guards the oneDNN ISA on CPUs that fault on AMX
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, impl, dtype = MODES[args.mode]
    torch.manual_seed(args.seed)
    model = scalr_zoo.create_model(
        {
            "width": args.width,
            "depth": args.depth,
            "norm": "layernorm",
            "act": "relu",
            "fov": [[-64, -64, -8], [64, 64, 8]],
            "grids": [[256, 256], [256, 32], [256, 32]],
            "sensor": args.sensor or SCAN_SENSORS.get(args.scan, "nuscenes"),
        }
    ).to(device)
    points = _load_scan(args.scan, args.scan_file)
    if impl == "floor":
        _matrix_products(args, model, points, device, dtype)
        return
    torch_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    options = {"impl": impl, "dtype": torch_dtype}
    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rss_before = _status_kib("VmRSS")
    _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    features = model.extract(points, **options)
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.extract(points, **options)
        sync()
        times.append(time.perf_counter() - start)
    result = {
        "scan": args.scan,
        "mode": args.mode,
        "points": int(points.shape[0]),
        "first_s": first,
        "times_s": times,
        "peak_rss_mib": (_status_kib("VmHWM") - rss_before) / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if impl == "fast":
        from scalr_zoo.fast import fast_engine

        engine = fast_engine(model, torch_dtype)
        result["engine_mib"] = engine.nbytes / 2**20
        result["amx_kernel"] = engine.amx is not None
    if cuda:
        result["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
        result["device_name"] = torch.cuda.get_device_name()
    np.save(args.features_out, features.float().cpu().numpy())
    print("RESULT " + json.dumps(result), flush=True)


def _matrix_products(args: argparse.Namespace, model, points: np.ndarray, device: str, dtype: str) -> None:
    """Time the network's large matrix products alone (see ``floor`` in the module docstring)."""
    import torch

    from scalr_zoo.fast import EMBED_CHUNK_POINTS, EMBED_CHUNK_POINTS_DEFAULT
    from scalr_zoo.preprocess import prepare_cloud

    cfg = model.config
    kept = prepare_cloud(torch.from_numpy(points).to(device), cfg.preprocess, cfg.arch.dim_proj).num_kept
    width, k = cfg.arch.width, cfg.preprocess.num_neighbors
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    chunk = min(EMBED_CHUNK_POINTS.get(device, EMBED_CHUNK_POINTS_DEFAULT), kept)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(width, width, device=device, generator=gen).to(torch_dtype)
    pairs = torch.randn(chunk * k, width, device=device, generator=gen).to(torch_dtype)
    tokens = torch.randn(kept, width, device=device, generator=gen).to(torch_dtype)
    pair_out = torch.empty_like(pairs)
    token_out = torch.empty_like(tokens)
    chunks = [min(chunk, kept - start) for start in range(0, kept, chunk)]
    products = 2 * cfg.arch.depth + 1

    from scalr_zoo._amx import amx_kernel, pack_weight

    kernel = amx_kernel() if device == "cpu" and torch_dtype == torch.bfloat16 else None
    if kernel is not None:  # the products the fast engine runs here: the AMX kernel's
        packed = pack_weight(weight)

        def product(x: torch.Tensor, out: torch.Tensor) -> None:
            kernel.linear(x, packed, None, out)
    else:

        def product(x: torch.Tensor, out: torch.Tensor) -> None:
            torch.mm(x, weight.t(), out=out)

    def run() -> None:
        for rows in chunks:
            product(pairs[: rows * k], pair_out[: rows * k])
        for _ in range(products):
            product(tokens, token_out)
        if device == "cuda":
            torch.cuda.synchronize()

    flops = 2 * width * width * (kept * k + products * kept)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(args.repeats, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result = {
        "scan": args.scan, "mode": args.mode, "points": int(points.shape[0]), "kept": kept, "first_s": first,
        "times_s": times, "tflop": flops / 1e12, "gflops": flops / min(times) / 1e9,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "amx_kernel": kernel is not None,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _accuracy(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    rms = float(np.sqrt(np.mean(e**2)))
    cosine = (a * e).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1), 1e-300)
    return {"max_err_rms": float(np.abs(a - e).max()) / rms, "cos_min": float(cosine.min()), "cos_mean": float(cosine.mean())}


def _run(args: argparse.Namespace, scan: str, mode: str, features_out: Path) -> dict | None:
    cmd = [
        sys.executable, __file__, "--worker", "--scan", scan, "--mode", mode,
        "--depth", str(args.depth), "--width", str(args.width), "--repeats", str(args.repeats),
        "--seed", str(args.seed), "--features-out", str(features_out),
    ]
    for flag, value in (("--threads", args.threads), ("--scan-file", args.scan_file), ("--sensor", args.sensor)):
        if value:
            cmd += [flag, str(value)]
    print(f"  running {scan} / {mode} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {scan} / {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
    return None


def _literal_of(mode: str) -> str:
    return "cuda-literal" if mode.startswith("cuda-") else "literal"



def _fp32_of(mode: str) -> str | None:
    for suffix in ("-bf16", "-fp16"):
        if mode.endswith(suffix):
            return mode[: -len(suffix)]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", default="nuscenes,kitti", help="comma-separated: nuscenes, kitti")
    parser.add_argument("--modes", default=None, help=f"comma-separated among {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up run")
    parser.add_argument("--depth", type=int, default=48)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--scan-file", help="a float32 x,y,z,intensity .bin to use instead of the synthetic scans")
    parser.add_argument("--sensor", help="intensity preset (default: the scan's)")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--features-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.modes:
        modes = args.modes.split(",")
    else:
        modes = list(DEFAULT_MODES)
        if _cuda_available():
            modes += DEFAULT_CUDA_MODES
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose among {list(MODES)}")
    scans = ["file"] if args.scan_file else args.scans.split(",")
    print(f"WI-{args.depth}-{args.width}, random weights; scans {scans}; modes {modes}; {args.repeats} timed run(s) after a warm-up")
    all_results = []
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        for scan in scans:
            results: dict[str, dict] = {}
            for mode in modes:
                out = Path(tmp) / f"{scan}-{mode}.npy"
                res = _run(args, scan, mode, out)
                if res is not None:
                    res["features"] = out if out.exists() else None
                    results[mode] = res
            _report(scan, results)
            for res in results.values():
                res.pop("features")
                all_results.append(res)
    if args.json:
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(all_results, indent=2))
        os.replace(tmp_json, args.json)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _report(scan: str, results: dict[str, dict]) -> None:
    if not results:
        return
    any_res = next(iter(results.values()))
    print(f"\n{scan}: {any_res['points']} points, torch {any_res['torch']}, {any_res['threads']} thread(s)")
    header = f"{'mode':18s} {'median s':>9s} {'first s':>8s} {'x literal':>9s} {'peak MiB':>9s}  {'vs literal fp32: max|err|/RMS':>29s} {'cos min':>9s} {'cos mean':>9s}"
    print(header)
    print("-" * len(header))
    loaded = {m: np.load(r["features"]) for m, r in results.items() if r["features"] is not None}
    for mode, res in results.items():
        res["median_s"] = float(np.median(res["times_s"])) if res["times_s"] else res["first_s"]
    for mode, res in results.items():
        literal = results.get(_literal_of(mode))
        ratio = literal["median_s"] / res["median_s"] if literal else float("nan")
        res["speedup_vs_literal"] = ratio
        if "tflop" in res:  # a floor: no features, no memory
            print(
                f"{mode:18s} {res['median_s']:9.3f} {res['first_s']:8.3f} {ratio:9.2f} {'':>9s}  "
                f"matrix products only: {res['tflop']:.2f} TFLOP at {res['gflops']:.0f} GFLOP/s, M = {res['kept']}"
            )
            continue
        peak = res.get("peak_cuda_mib", res["peak_rss_mib"])
        line = f"{mode:18s} {res['median_s']:9.3f} {res['first_s']:8.3f} {ratio:9.2f} {peak:9.0f}"
        if "literal" in loaded and mode in loaded:
            acc = _accuracy(loaded[mode], loaded["literal"])
            res["vs_literal_fp32"] = acc
            line += f"  {acc['max_err_rms']:29.2e} {acc['cos_min']:9.6f} {acc['cos_mean']:9.6f}"
        print(line)
    for mode in results:
        base = _fp32_of(mode)
        if base in loaded and mode in loaded:
            acc = _accuracy(loaded[mode], loaded[base])
            results[mode]["vs_fp32"] = acc
            print(
                f"{mode} vs {base}: max|err|/RMS {acc['max_err_rms']:.2e}, per-point cosine min {acc['cos_min']:.6f} "
                f"mean {acc['cos_mean']:.6f}"
            )
    for mode, res in results.items():
        if "engine_mib" in res:
            print(f"{mode}: peak includes the engine's folded weights, {res['engine_mib']:.0f} MiB")
        if res.get("amx_kernel"):
            print(f"{mode}: bfloat16 products on scalr_zoo's AMX kernel (oneDNN is capped below AMX here)")


if __name__ == "__main__":
    main()
