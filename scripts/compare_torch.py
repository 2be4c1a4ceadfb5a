#!/usr/bin/python3
"""distgn against torch.nn.functional.group_norm on the CPU, forward and
backward, the same shapes in one run, alternating between the two so that
both see the same machine state. Prints per shape the median times, the
ratio torch/distgn (> 1: distgn is faster) and the threads each used.

Uses Debian's python3-torch (scripts/setup.sh --bench installs it) or any
torch importable by this python. distgn runs as `build/distgn bench`.

With --python, the Python path instead: the modules distgn.torch.GroupNorm
and torch.nn.GroupNorm in this process, forward (autograd recording, as
training runs it) and forward+backward, on the README's shapes and on small
ones (1x32x8x8, 2x64x16x16) where the per-call cost shows. Beside them the
same layer called without the binding's Python (the extension's
Layer.forward / backward on prebuilt views, into preallocated outputs) and,
if --binary exists, `distgn bench` (the C++ call alone); the differences are
the binding's per-call overhead. Run it with the python that has distgn
installed (scripts/setup.sh --python && .venv-python/bin/pip install .).

  scripts/compare_torch.py                      # the issue's shapes, float32, G=32
  scripts/compare_torch.py --shapes 8,64,64,320 --layouts nhwc --rounds 5 --json out.json
  .venv-python/bin/python scripts/compare_torch.py --python --binary build-py-cli/distgn
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
SMALL_SHAPES = ["1,8,8,32", "2,16,16,64"]  # NCHW 1x32x8x8, 2x64x16x16


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


def cpu_model():
    """The CPU's model name (/proc/cpuinfo) and the cores this process may use."""
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "%s, %d core(s)" % (name, len(os.sched_getaffinity(0)))


def timed_ms(fn, iters, warmup):
    """Median wall time of fn() in ms over iters calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return median(times)


class PythonCase:
    """One shape and layout: x, dy and the four ways to run it."""

    def __init__(self, torch, dgn, shape_nhwc, layout, groups):
        n, c, spatial = shape_nhwc[0], shape_nhwc[-1], shape_nhwc[1:-1]
        g = torch.Generator().manual_seed(0)
        x = torch.randn([n, c, *spatial], generator=g)
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        self.torch, self.fmt = torch, fmt
        self.x = x.contiguous(memory_format=fmt).requires_grad_()
        self.dy = torch.randn(x.shape, generator=g).contiguous(memory_format=fmt)
        self.ours = dgn.GroupNorm(groups, c)
        self.theirs = torch.nn.GroupNorm(groups, c)
        with torch.no_grad():  # the same parameters, not the identity
            self.ours.weight.uniform_(0.5, 1.5, generator=g)
            self.ours.bias.uniform_(-0.5, 0.5, generator=g)
            self.theirs.load_state_dict(self.ours.state_dict())
        # The extension's layer on prebuilt views: the C++ call and nanobind's
        # dispatch, none of the binding's Python.
        cfg = self.ours._cfg
        xd = self.x.detach()
        xc, dlayout, pshape, _ = dgn._layout_of(xd)
        self.layer = cfg.layer("f32", "f32", True, True)
        cfg.load_parameters(self.layer, self.ours.weight.detach(), self.ours.bias.detach())
        self.y = torch.empty_like(xd)
        self.dx = torch.empty_like(xd)
        self.dw, self.db = torch.empty(c), torch.empty(c)
        self.views = [dgn._view(t, dlayout, pshape) for t in (xc, self.y, self.dy, self.dx)]
        self.pviews = [dgn._param(self.dw), dgn._param(self.db)]
        self.state = dgn._distgn.ForwardState()
        self.owners = (xc,)
        self.direct_forward()
        # parity, so that the times below are of a correct layer
        ya, yb = self.ours(self.x), self.theirs(self.x)
        self.forward_error = ((ya - yb).abs().max() / yb.abs().max()).item()

    def module_forward(self, m):
        return lambda: m(self.x)

    def module_step(self, m):
        def step():
            m(self.x).backward(self.dy)
            self.x.grad = m.weight.grad = m.bias.grad = None
        return step

    def direct_forward(self):
        xv, yv = self.views[0], self.views[1]
        self.layer.forward(xv, yv, None, self.state)

    def direct_step(self):
        xv, yv, dyv, dxv = self.views
        self.layer.forward(xv, yv, None, self.state)
        self.layer.backward(xv, dyv, None, self.state, dxv, self.pviews[0], self.pviews[1])


def python_path(args, torch):
    try:
        import distgn.torch as dgn
    except ImportError:
        sys.exit("compare_torch --python: distgn is not importable by %s; run scripts/setup.sh --python && "
                 ".venv-python/bin/pip install . and use .venv-python/bin/python" % sys.executable)
    have_binary = os.access(args.binary, os.X_OK)
    shapes = args.shapes.split(";") if args.shapes_given else SMALL_SHAPES + DEFAULT_SHAPES
    print("CPU: %s; load average %s (a shared machine: figures are noisy)" % (
        cpu_model(), " ".join(open("/proc/loadavg").read().split()[:3])))
    print("threads: torch %d, distgn %d (OpenMP, OMP_NUM_THREADS=%s); torch %s; float32, G=%d; per shape %d "
          "alternating rounds, each a median of its iterations, then the median of the rounds" % (
              torch.get_num_threads(), args.threads, os.environ.get("OMP_NUM_THREADS", "unset"),
              torch.__version__, args.groups, args.rounds))
    print("fwd: module forward with autograd recording; step: forward + backward (dx, dweight, dbias)")
    print("direct: the extension's Layer.forward/backward on prebuilt views (no binding Python); "
          "C++: %s" % ("`%s bench` (its backward makes no dweight/dbias)" % args.binary if have_binary
                       else "not run (no %s)" % args.binary))
    header = "%-18s %-5s %9s %9s %6s %9s %9s %6s | %8s %8s %8s %8s | %8s %8s" % (
        "shape (NCHW)", "x", "fwd ms", "torch ms", "ratio", "step ms", "torch ms", "ratio",
        "dir fwd", "dir step", "C++ fwd", "C++ step", "ovh fwd", "ovh step")
    print(header)
    print("%-18s %-5s %9s %9s %6s %9s %9s %6s | %8s %8s %8s %8s | %8s %8s" % (
        "", "", "distgn", "", "", "distgn", "", "", "ms", "ms", "ms", "ms", "us", "us"))
    results = []
    for shape_text in shapes:
        nhwc = [int(v) for v in shape_text.split(",")]
        nchw = [nhwc[0], nhwc[-1], *nhwc[1:-1]]
        for layout in args.layouts.split(","):
            case = PythonCase(torch, dgn, nhwc, layout, args.groups)
            # iterations: about 0.1 s of torch forward+backward per round, at least --iters
            probe = timed_ms(case.module_step(case.theirs), 3, 1)
            iters = max(args.iters, min(2000, int(100.0 / max(probe, 1e-3))))
            runs = {k: [] for k in ("fwd", "tfwd", "step", "tstep", "dfwd", "dstep", "cfwd", "cstep")}
            for _ in range(args.rounds):  # alternate: distgn, torch, direct, C++, ...
                runs["fwd"].append(timed_ms(case.module_forward(case.ours), iters, args.warmup))
                runs["tfwd"].append(timed_ms(case.module_forward(case.theirs), iters, args.warmup))
                runs["step"].append(timed_ms(case.module_step(case.ours), iters, args.warmup))
                runs["tstep"].append(timed_ms(case.module_step(case.theirs), iters, args.warmup))
                runs["dfwd"].append(timed_ms(case.direct_forward, iters, args.warmup))
                runs["dstep"].append(timed_ms(case.direct_step, iters, args.warmup))
                if have_binary:
                    f, b, _ = distgn_times(args.binary, ",".join(map(str, nhwc if layout == "nhwc" else nchw)),
                                           layout, "f32", args.groups, args.threads, iters, args.warmup)
                    runs["cfwd"].append(f)
                    runs["cstep"].append(f + b)
            m = {k: (median(v) if v else float("nan")) for k, v in runs.items()}
            row = {"shape_nchw": nchw, "layout": layout, "iters": iters, "rounds": args.rounds,
                   "forward_rel_error_vs_torch": case.forward_error,
                   **{k + "_ms": v for k, v in m.items()},
                   "overhead_fwd_us_vs_direct": (m["fwd"] - m["dfwd"]) * 1e3,
                   "overhead_step_us_vs_direct": (m["step"] - m["dstep"]) * 1e3,
                   "overhead_fwd_us_vs_cpp": (m["fwd"] - m["cfwd"]) * 1e3,
                   "overhead_step_us_vs_cpp": (m["step"] - m["cstep"]) * 1e3}
            results.append(row)
            print("%-18s %-5s %9.3f %9.3f %5.2fx %9.3f %9.3f %5.2fx | %8.3f %8.3f %8.3f %8.3f | %8.1f %8.1f" % (
                "x".join(map(str, nchw)), "CL" if layout == "nhwc" else "cont", m["fwd"], m["tfwd"],
                m["tfwd"] / m["fwd"], m["step"], m["tstep"], m["tstep"] / m["step"], m["dfwd"], m["dstep"],
                m["cfwd"], m["cstep"], row["overhead_fwd_us_vs_direct"], row["overhead_step_us_vs_direct"]),
                flush=True)
            if case.forward_error > 1e-5:
                sys.exit("compare_torch: distgn.torch differs from torch.nn.GroupNorm by %.2e (relative) on %s" % (
                    case.forward_error, nchw))
    print("ratio = torch time / distgn.torch time (> 1: distgn is faster); x: CL = channels_last (distgn "
          "NHWC), cont = contiguous (NCHW)")
    print("ovh = distgn.torch module time - direct call time (the binding's Python per call); "
          "against the C++ call: see --json (overhead_*_vs_cpp)")
    for r in results:
        if r["shape_nchw"] in ([1, 32, 8, 8], [2, 64, 16, 16]):
            print("overhead %s %s: fwd %.1f us over direct, %.1f us over C++; step %.1f us over direct, "
                  "%.1f us over C++" % ("x".join(map(str, r["shape_nchw"])), r["layout"],
                                        r["overhead_fwd_us_vs_direct"], r["overhead_fwd_us_vs_cpp"],
                                        r["overhead_step_us_vs_direct"], r["overhead_step_us_vs_cpp"]))
    print("load average at the end: %s" % " ".join(open("/proc/loadavg").read().split()[:3]))
    return results


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
    parser.add_argument("--python", action="store_true",
                        help="the Python path: distgn.torch.GroupNorm vs torch.nn.GroupNorm in this process")
    args = parser.parse_args()
    args.shapes_given = any(a == "--shapes" or a.startswith("--shapes=") for a in sys.argv[1:])

    try:
        import torch
    except ImportError:
        sys.exit("compare_torch: torch is not importable by %s; install Debian's python3-torch "
                 "(scripts/setup.sh --bench) or torch from PyPI" % sys.executable)
    if args.python:
        torch.set_num_threads(args.threads)
        results = python_path(args, torch)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)
        return
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
