#!/usr/bin/python3
"""distgn against torch.nn.functional.group_norm on the CPU, forward and
backward, the same shapes in one run, alternating between the two so that
both see the same machine state. Prints per shape the median times, the
ratio torch/distgn (> 1: distgn is faster) and the threads each used.

Uses Debian's python3-torch (scripts/setup.sh --bench installs it) or any
torch importable by this python. distgn runs as `build/distgn bench`.

  scripts/compare_torch.py                      # the issue's shapes, float32, G=32
  scripts/compare_torch.py --shapes 8,64,64,320 --layouts nhwc --rounds 5 --json out.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPES = ["8,64,64,320", "16,56,56,64", "2,16,16,1280"]


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def distgn_times(binary, shape, layout, dtype, groups, threads, iters, warmup):
    """One `distgn bench` run: (fwd_ms, bwd_ms, copy_gbps), medians of iters."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        subprocess.run(
            [binary, "bench", "--shape", shape, "--layout", layout, "--dtype", dtype,
             "--num-groups", str(groups), "--threads", str(threads), "--iters", str(iters),
             "--warmup", str(warmup), "--json", out.name],
            check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        result = json.loads(open(out.name).read().splitlines()[0])
    return result["fwd_ms"], result["bwd_ms"], result["copy_gbps"]


def torch_times(torch, shape, layout, dtype, groups, iters, warmup):
    """Forward (with autograd recording, as training runs it) and backward of
    F.group_norm with scale and bias; x NHWC is channels_last memory."""
    n, c = shape[0], (shape[-1] if layout == "nhwc" else shape[1])
    spatial = shape[1:-1] if layout == "nhwc" else shape[2:]
    torch_dtype = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}[dtype]
    x = torch.randn([n, c, *spatial], dtype=torch_dtype)
    if layout == "nhwc" and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.ones(c, dtype=torch_dtype, requires_grad=True)
    bias = torch.zeros(c, dtype=torch_dtype, requires_grad=True)
    dy = torch.randn_like(x)
    fwd, bwd = [], []
    for i in range(warmup + iters):
        start = time.perf_counter()
        y = torch.nn.functional.group_norm(x, groups, weight, bias, 1e-6)
        middle = time.perf_counter()
        y.backward(dy)
        end = time.perf_counter()
        x.grad = weight.grad = bias.grad = None
        if i >= warmup:
            fwd.append((middle - start) * 1e3)
            bwd.append((end - middle) * 1e3)
    return median(fwd), median(bwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=";".join(DEFAULT_SHAPES), help="';'-separated N,...,C (nhwc) shapes")
    parser.add_argument("--layouts", default="nhwc,nchw", help="nhwc and/or nchw (shapes are given NHWC)")
    parser.add_argument("--dtype", default="f32", choices=["f32", "f64", "bf16"])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per shape; medians over them")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--binary", default=os.path.join(ROOT, "build", "distgn"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        sys.exit("compare_torch: torch is not importable by %s; install Debian's python3-torch "
                 "(scripts/setup.sh --bench) or torch from PyPI" % sys.executable)
    if not os.access(args.binary, os.X_OK):
        sys.exit("compare_torch: %s not found; run scripts/build.sh first" % args.binary)
    torch.set_num_threads(args.threads)
    print("threads: distgn %d (OpenMP), torch %d (torch.get_num_threads()); torch %s; %s, G=%d; "
          "medians of %d rounds x %d iterations" % (args.threads, torch.get_num_threads(), torch.__version__,
                                                   args.dtype, args.groups, args.rounds, args.iters))
    header = "%-18s %-5s %9s %9s %7s %9s %9s %7s" % ("shape (NHWC)", "layout", "fwd ms", "torch ms", "ratio",
                                                    "bwd ms", "torch ms", "ratio")
    print(header)
    results = []
    for shape_text in args.shapes.split(";"):
        nhwc = [int(v) for v in shape_text.split(",")]
        for layout in args.layouts.split(","):
            shape = nhwc if layout == "nhwc" else [nhwc[0], nhwc[-1], *nhwc[1:-1]]
            d_fwd, d_bwd, t_fwd, t_bwd, copy = [], [], [], [], []
            for _ in range(args.rounds):  # alternate: distgn, torch, distgn, torch...
                f, b, g = distgn_times(args.binary, ",".join(map(str, shape)), layout, args.dtype, args.groups,
                                       args.threads, args.iters, args.warmup)
                d_fwd.append(f); d_bwd.append(b); copy.append(g)
                f, b = torch_times(torch, shape, layout, args.dtype, args.groups, args.iters, args.warmup)
                t_fwd.append(f); t_bwd.append(b)
            row = {"shape": shape, "layout": layout, "dtype": args.dtype, "groups": args.groups,
                   "threads": args.threads, "distgn_fwd_ms": median(d_fwd), "distgn_bwd_ms": median(d_bwd),
                   "torch_fwd_ms": median(t_fwd), "torch_bwd_ms": median(t_bwd), "copy_gbps": median(copy)}
            row["fwd_ratio"] = row["torch_fwd_ms"] / row["distgn_fwd_ms"]
            row["bwd_ratio"] = row["torch_bwd_ms"] / row["distgn_bwd_ms"]
            results.append(row)
            print("%-18s %-5s %9.3f %9.3f %6.2fx %9.3f %9.3f %6.2fx" % (
                shape_text, layout, row["distgn_fwd_ms"], row["torch_fwd_ms"], row["fwd_ratio"],
                row["distgn_bwd_ms"], row["torch_bwd_ms"], row["bwd_ratio"]), flush=True)
    print("ratio = torch time / distgn time (> 1: distgn is faster)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
