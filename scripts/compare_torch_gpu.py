#!/usr/bin/env python3
"""distgn's CUDA backend against torch.nn.functional.group_norm on the same GPU.

Two steps, both used by scripts/gpu_check.sh:

  compare_torch_gpu.py torch --shapes "2,64,64,320;..." --dtypes bf16,f16,f32 --json torch.jsonl
      times F.group_norm forward and backward (weight and bias in the input's
      dtype and requiring grad, x channels_last / channels_last_3d, as a
      channels-last network runs it) with CUDA events, medians of --iters,
      plus the device-to-device copy of x in the same run.

  compare_torch_gpu.py table --distgn bench_bf16.jsonl ... --torch torch.jsonl [--json out.json]
      joins those with `distgn bench --backend cuda --json` results and prints
      forward and backward GB/s (model bytes 2*E*s and 3*E*s), the fraction
      of the copy bandwidth measured in the same run, and torch's time over
      distgn's (> 1: distgn is faster).

Without torch the first step says so and writes nothing; the table then has
no torch columns.
"""
import argparse
import json
import math
import os
import sys

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8}


def median(values):
    v = sorted(values)
    n = len(v)
    if n == 0:
        return float("nan")
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def parse_shapes(text):
    return [tuple(int(d) for d in s.split(",")) for s in text.split(";") if s.strip()]


def torch_step(args):
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch"
        print(f"torch: not importable ({e}); no torch comparison", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        print("torch: no CUDA device visible to torch; no torch comparison", file=sys.stderr)
        return 0
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
    device = torch.device("cuda")
    out = open(args.json, "w") if args.json else None
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    for name in args.dtypes.split(","):
        dt = dtypes[name]
        for shape in parse_shapes(args.shapes):
            n, c, spatial = shape[0], shape[-1], shape[1:-1]  # shapes are given N, ..., C
            x = torch.randn((n, c, *spatial), device=device, dtype=dt)
            if len(spatial) == 2:
                x = x.contiguous(memory_format=torch.channels_last)
            elif len(spatial) == 3:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            x.requires_grad_(True)
            weight = torch.ones(c, device=device, dtype=dt, requires_grad=True)
            bias = torch.zeros(c, device=device, dtype=dt, requires_grad=True)
            dy = torch.randn_like(x)
            copy_target = torch.empty_like(x)
            start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            fwd, bwd, copy = [], [], []
            for i in range(args.warmup + args.iters):
                start.record()
                with torch.no_grad():
                    copy_target.copy_(x)
                end.record()
                torch.cuda.synchronize()
                copy_ms = start.elapsed_time(end)
                start.record()
                y = torch.nn.functional.group_norm(x, args.groups, weight, bias, 1e-6)
                middle.record()
                y.backward(dy)
                end.record()
                torch.cuda.synchronize()
                x.grad = weight.grad = bias.grad = None
                if i >= args.warmup:
                    fwd.append(start.elapsed_time(middle))
                    bwd.append(middle.elapsed_time(end))
                    copy.append(copy_ms)
            elements = x.numel()
            size = x.element_size()
            row = {
                "shape": list(shape), "dtype": name, "groups": args.groups,
                "torch_fwd_ms": median(fwd), "torch_bwd_ms": median(bwd),
                "torch_copy_gbps": 2 * elements * size / (median(copy) * 1e-3) * 1e-9,
                "torch_output_dtype": str(y.dtype).replace("torch.", ""),
            }
            print(json.dumps(row))
            if out:
                out.write(json.dumps(row) + "\n")
            del x, dy, y, copy_target, weight, bias
            torch.cuda.empty_cache()
    if out:
        out.close()
    return 0


def load_jsonl(paths):
    rows = []
    for path in paths:
        if not path or not os.path.exists(path):
            continue
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def table_step(args):
    distgn = load_jsonl(args.distgn)
    torch_rows = {(tuple(r["shape"]), r["dtype"]): r for r in load_jsonl([args.torch])}
    header = ("shape", "dtype", "copy GB/s", "fwd ms", "fwd GB/s", "fwd/copy", "bwd ms", "bwd GB/s", "bwd/copy",
              "torch fwd ms", "torch bwd ms", "fwd x torch", "bwd x torch")
    lines = []
    results = []
    for r in distgn:
        shape, dtype = tuple(r["shape"]), r["dtype"]
        elements = math.prod(shape)
        s = DTYPE_BYTES[dtype]
        fwd_gbps = 2 * elements * s / (r["fwd_ms"] * 1e-3) * 1e-9  # the model bytes
        bwd_gbps = 3 * elements * s / (r["bwd_ms"] * 1e-3) * 1e-9
        copy = r["copy_gbps"]
        t = torch_rows.get((shape, dtype))
        entry = {
            "shape": list(shape), "dtype": dtype, "copy_gbps": copy,
            "fwd_ms": r["fwd_ms"], "fwd_gbps": fwd_gbps, "fwd_of_copy": fwd_gbps / copy,
            "bwd_ms": r["bwd_ms"], "bwd_gbps": bwd_gbps, "bwd_of_copy": bwd_gbps / copy,
            "torch_fwd_ms": t["torch_fwd_ms"] if t else None, "torch_bwd_ms": t["torch_bwd_ms"] if t else None,
            "fwd_speedup_vs_torch": t["torch_fwd_ms"] / r["fwd_ms"] if t else None,
            "bwd_speedup_vs_torch": t["torch_bwd_ms"] / r["bwd_ms"] if t else None,
            "targets_met": {
                "fwd_85pct_copy": fwd_gbps >= 0.85 * copy,
                "bwd_75pct_copy": bwd_gbps >= 0.75 * copy,
                "faster_than_torch": bool(t) and t["torch_fwd_ms"] > r["fwd_ms"] and t["torch_bwd_ms"] > r["bwd_ms"],
            },
        }
        results.append(entry)
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append((
            "x".join(map(str, shape)), dtype, f"{copy:.0f}", f"{r['fwd_ms']:.4f}", f"{fwd_gbps:.0f}",
            f"{100 * fwd_gbps / copy:.0f}%", f"{r['bwd_ms']:.4f}", f"{bwd_gbps:.0f}", f"{100 * bwd_gbps / copy:.0f}%",
            fmt(entry["torch_fwd_ms"], ".4f"), fmt(entry["torch_bwd_ms"], ".4f"),
            fmt(entry["fwd_speedup_vs_torch"], ".2f"), fmt(entry["bwd_speedup_vs_torch"], ".2f")))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for line in lines:
        print("  ".join(str(v).rjust(w) for v, w in zip(line, widths)))
    print("model bytes: forward 2*E*s, backward 3*E*s (E elements of s bytes); copy: device-to-device copy of x "
          "in the same run; x torch: torch's median time / distgn's (> 1: distgn faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": results}, f, indent=1)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    t = sub.add_parser("torch", help="time torch.nn.functional.group_norm")
    t.add_argument("--shapes", required=True, help="';'-separated N,...,C shapes")
    t.add_argument("--dtypes", default="bf16,f16,f32")
    t.add_argument("--groups", type=int, default=32)
    t.add_argument("--iters", type=int, default=20)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--json")
    b = sub.add_parser("table", help="join distgn bench and torch results")
    b.add_argument("--distgn", nargs="+", default=[])
    b.add_argument("--torch")
    b.add_argument("--json")
    args = parser.parse_args()
    return torch_step(args) if args.step == "torch" else table_step(args)


if __name__ == "__main__":
    sys.exit(main())
