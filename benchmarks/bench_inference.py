"""Inference benchmark of the network segmenter: DICOM files → label map, and volume → label map.

    python benchmarks/bench_inference.py [--slices 120] [--repeats 3] [--weights PATH] [--threads N]
    python benchmarks/bench_inference.py --table4 [--weights-dir DIR]

Default mode, on one synthetic 512×512 chest CT held in memory (the phantom of
``lungburden.phantom`` when present, else ellipses + noise):

* median wall time of files → label map (``load_files`` of the phantom written as a 512×512 DICOM
  series, then ``segment``) for the fast path and for the naive path (every window re-encodes its
  11 slices, float32) in the same run, and their ratio; the fast path runs at ``--precision``
  (default ``auto``: bfloat16 convolutions on CPUs with AMX / AVX512-BF16) and, when that is not
  float32, also at float32, so the gain of the algorithm and that of the arithmetic show apart;
* the same for ``segment(volume)`` alone, and where the fast path's time goes
  (preprocessing / network / logits → labels);
* peak resident memory of a 500-slice run in a fresh subprocess (``VmHWM``, including the 0.5 GB
  float32 HU volume and the Python/torch runtime).

``--table4``: paper Table 4 style — time and peak memory for 16 slices with ConvLSTM, UNet2D and
UNet3D, each in a fresh subprocess. Random initialisation unless weights are given (timing does
not depend on the weights' values, except for the argmax post-processing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_volume(slices: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """A float32 HU chest-like volume, preferably the phantom (tiled along z if needed)."""
    try:
        from lungburden.phantom import PhantomSpec, generate_phantom
    except ImportError:
        generate_phantom = None
    if generate_phantom is not None and slices <= 160:
        spec = PhantomSpec(seed=seed, slices=slices, slice_spacing_mm=2.5, rows=size, cols=size, burden_percent=20)
        return generate_phantom(spec).hu.astype(np.float32)
    return ellipse_volume(slices, size, seed)


def ellipse_volume(slices: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """Body ellipse, two lungs with blobs, noise; built slice by slice (no full-size temporaries)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((y - 0.5) / 0.32) ** 2 + ((x - 0.5) / 0.42) ** 2 < 1
    hu = np.empty((slices, size, size), np.float32)
    for k in range(slices):
        z = k / max(slices - 1, 1)
        s = hu[k]
        s.fill(-1000.0)
        s[body] = 40.0
        r = 0.25 * np.sin(np.pi * z) + 0.02
        for cx in (0.32, 0.68):
            s[((y - 0.48) / r) ** 2 + ((x - cx) / (0.6 * r)) ** 2 < 1] = -850.0
        s[((y - 0.45 - 0.1 * z) / 0.05) ** 2 + ((x - 0.3) / 0.05) ** 2 < 1] = -500.0
        s += rng.normal(0.0, 20.0, s.shape).astype(np.float32)
    return hu


def write_series(slices: int, out: Path, size: int = 512) -> list[Path]:
    """The benchmark phantom written as a DICOM CT series; returns its files."""
    from lungburden.phantom import PhantomSpec, generate_phantom, write_phantom_series

    spec = PhantomSpec(seed=0, slices=slices, slice_spacing_mm=2.5, rows=size, cols=size, burden_percent=20)
    write_phantom_series(generate_phantom(spec), out, spec)
    return sorted(out.glob("*.dcm"))


def vm_hwm_mib() -> float:
    """Peak resident set size of this process (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_segmenter(model_name: str, weights: str | None, naive: bool = False, threads: int | None = None,
                   precision: str | None = None):
    from lungburden.segmentation.convlstm import ConvLSTMSegmenter
    from lungburden.segmentation.networks import build_model

    if weights:
        return ConvLSTMSegmenter(weights_path=weights, naive=naive, threads=threads, precision=precision)
    import torch

    torch.manual_seed(0)
    return ConvLSTMSegmenter(model=build_model(model_name), naive=naive, threads=threads, precision=precision)


def timed(fn, repeats: int) -> tuple[float, float, list[float]]:
    """Median wall and CPU seconds of ``fn()`` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), walls


def stage_times(seg, hu: np.ndarray) -> dict[str, float]:
    """Wall seconds of one ``segment`` call: total, preprocessing, and the rest (network, with
    logits → labels overlapped on the segmenter's helper thread); ``labels_busy``: seconds that
    thread spent in logits → labels."""
    from lungburden.segmentation import convlstm as predict

    spent = {"preprocess": 0.0, "logits_to_labels": 0.0}
    originals = {name: getattr(predict, name) for name in spent}

    def wrap(name):
        def inner(*args, **kwargs):
            t = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return inner

    for name in spent:
        setattr(predict, name, wrap(name))
    try:
        t = time.perf_counter()
        seg.segment(hu)
        total = time.perf_counter() - t
    finally:
        for name, fn in originals.items():
            setattr(predict, name, fn)
    return {"total": total, "preprocess": spent["preprocess"], "network": total - spent["preprocess"],
            "labels_busy": spent["logits_to_labels"]}


def child(args: argparse.Namespace) -> None:
    """Subprocess: build the volume, segment once, print JSON with timing and memory."""
    hu = ellipse_volume(args.child_slices) if args.child_slices > 160 else synthetic_volume(args.child_slices)
    seg = make_segmenter(args.child_model, args.weights, threads=args.threads, precision=args.precision)
    base = vm_hwm_mib()  # volume + Python + torch + model, before segment()
    w, c = time.perf_counter(), time.process_time()
    labels = seg.segment(hu)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    print(json.dumps({"model": args.child_model, "slices": int(hu.shape[0]), "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mib": vm_hwm_mib(), "rss_before_mib": base,
                      "volume_mib": hu.nbytes / 2**20, "labels_max": int(labels.max())}))


def run_child(model: str, slices: int, args: argparse.Namespace, weights: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_child", "--_child-model", model, "--_child-slices", str(slices)]
    if weights:
        cmd += ["--weights", weights]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--precision", args.precision]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_default(args: argparse.Namespace) -> None:
    import torch

    from lungburden.dicom_io.volume import load_files
    from lungburden.segmentation.convlstm import native_bfloat16
    from lungburden.segmentation.networks import count_parameters

    hu = synthetic_volume(args.slices)
    fast = make_segmenter("convlstm", args.weights, threads=args.threads, precision=args.precision)
    naive = make_segmenter("convlstm", args.weights, naive=True, threads=args.threads, precision="float32")
    fast32 = None
    if fast.precision != "float32":
        fast32 = make_segmenter("convlstm", args.weights, threads=args.threads, precision="float32")
    model = fast.model
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {args.threads or 'all'}, load avg {os.getloadavg()[0]:.1f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"model: convlstm {json.dumps(fast.source_model.hparams)}")
    print(f"parameters: {count_parameters(model)} ({count_parameters(model) * 4 / 2**20:.2f} MB float32); "
          f"weights: {args.weights or 'random init'}")
    print(f"precision: fast path {fast.precision} (--precision {args.precision}; CPU bfloat16 in hardware: "
          f"{native_bfloat16()}), naive path float32")
    print(f"volume: {hu.shape[0]} slices × {hu.shape[1]}×{hu.shape[2]} float32 HU")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_series(args.slices, Path(tmp))
        t_fast, _, t_fast_all = timed(lambda: fast.segment(load_files(files)), args.repeats)
        t_naive, _, t_naive_all = timed(lambda: naive.segment(load_files(files)), args.repeats)
        if fast32 is not None:
            t_fast32, _, t_fast32_all = timed(lambda: fast32.segment(load_files(files)), args.repeats)
        t_load, _, _ = timed(lambda: load_files(files), args.repeats)
    print(f"fast  files→labels ({fast.precision}): median wall {t_fast:.2f} s runs "
          f"{[round(x, 2) for x in t_fast_all]} (of which loading {len(files)} DICOM files {t_load:.2f} s)")
    if fast32 is not None:
        print(f"fast  files→labels (float32): median wall {t_fast32:.2f} s runs {[round(x, 2) for x in t_fast32_all]}")
    print(f"naive files→labels (float32): median wall {t_naive:.2f} s runs {[round(x, 2) for x in t_naive_all]}")
    print(f"speed-up files→labels fast vs naive: {t_naive / t_fast:.1f}×"
          + (f" ({fast.precision}); float32 fast vs naive {t_naive / t_fast32:.1f}×" if fast32 is not None else ""))
    f_wall, f_cpu, f_all = timed(lambda: fast.segment(hu), args.repeats)
    n_wall, n_cpu, n_all = timed(lambda: naive.segment(hu), args.repeats)
    naive_labels = naive.segment(hu)
    same = float(np.mean(fast.segment(hu) == naive_labels))
    same32 = float(np.mean(fast32.segment(hu) == naive_labels)) if fast32 is not None else same
    runs = [stage_times(fast, hu) for _ in range(args.repeats)]
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    naive_runs = [stage_times(naive, hu) for _ in range(max(1, args.repeats // 2))]
    naive_network = statistics.median(r["network"] for r in naive_runs)
    print(f"fast  volume→labels: median wall {f_wall:.2f} s (CPU {f_cpu:.2f} s) runs {[round(x, 2) for x in f_all]}")
    print(f"naive volume→labels: median wall {n_wall:.2f} s (CPU {n_cpu:.2f} s) runs {[round(x, 2) for x in n_all]}")
    print(f"speed-up fast vs naive: {n_wall / f_wall:.1f}× wall, {n_cpu / f_cpu:.1f}× CPU; identical labels: "
          f"{same * 100:.4f} % ({fast.precision} vs float32), float32 fast vs naive {same32 * 100:.4f} %")
    print(f"fast path stages (median wall): preprocess {stages['preprocess']:.2f} s, network + logits→labels "
          f"{stages['network']:.2f} s (the labels thread was busy {stages['labels_busy']:.2f} s of it); "
          f"network-stage speed-up vs naive ≈ {naive_network / max(stages['network'], 1e-9):.1f}×")
    if args.memory_slices:
        mem = run_child("convlstm", args.memory_slices, args, args.weights)
        print(f"{mem['slices']}-slice run (fresh process): peak RSS {mem['peak_rss_mib']:.0f} MiB "
              f"(HU volume {mem['volume_mib']:.0f} MiB; before segment(), with torch and the model loaded: "
              f"{mem['rss_before_mib']:.0f} MiB), "
              f"wall {mem['wall_s']:.1f} s, CPU {mem['cpu_s']:.1f} s")


def main_table4(args: argparse.Namespace) -> None:
    print("Table 4 style: 16 slices of 512×512, volume → labels, each model in a fresh process")
    print("| model | parameters | wall s | CPU s | peak RSS MiB | RSS growth in segment MiB |")
    print("|---|---|---|---|---|---|")
    from lungburden.segmentation.networks import build_model, count_parameters

    for name in ("convlstm", "unet2d", "unet3d"):
        weights = None
        if args.weights_dir and (Path(args.weights_dir) / f"{name}.pt").is_file():
            weights = str(Path(args.weights_dir) / f"{name}.pt")
        runs = [run_child(name, 16, args, weights) for _ in range(args.repeats)]
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        peak = max(r["peak_rss_mib"] for r in runs)
        grow = max(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs)
        print(f"| {name} | {count_parameters(build_model(name))} | {wall:.2f} | {cpu:.2f} | {peak:.0f} | {grow:.0f} |")
    print("(first call in a fresh process, so it includes one-off oneDNN set-up; median of "
          f"{args.repeats} processes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=120, help="slices of the timed volume (default 120)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median; default 3)")
    p.add_argument("--memory-slices", type=int, default=500,
                   help="slices of the peak-memory run in a subprocess (default 500; 0 = skip)")
    p.add_argument("--weights", default=None, help="checkpoint (default: random initialisation)")
    p.add_argument("--weights-dir", default=None, help="--table4: folder with convlstm.pt, unet2d.pt, unet3d.pt")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="arithmetic of the fast path's network (default auto; the naive path is float32)")
    p.add_argument("--table4", action="store_true", help="ConvLSTM vs UNet2D vs UNet3D on 16 slices")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child-model", dest="child_model", default="convlstm", help=argparse.SUPPRESS)
    p.add_argument("--_child-slices", dest="child_slices", type=int, default=500, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args)
    elif args.table4:
        main_table4(args)
    else:
        main_default(args)


if __name__ == "__main__":
    main()
