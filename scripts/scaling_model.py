#!/usr/bin/python3
"""An alpha-beta model of distgn's collectives, fitted to the emulated-host
measurements of scripts/bench_nodes.sh, validated on held-out points, and
carried to 64, 256 and 1024 ranks with published network constants.

  scripts/scaling_model.py [bench-results/nodes/nodes.json] [--out DIR]

Writes DIR/model.json and DIR/model_efficiency.png (DIR defaults to the
directory of the input) and prints the tables docs/scaling.md quotes.

The model
---------
The forward's one collective is an allgather of m_f = 8 (1 + 3 C) bytes per
rank (a flag, then count, mean and M2 of each of the C cells; C = N * G),
after which every rank merges the P gathered records in rank order on the
host (P * C Chan merges, gamma each). The backward's is an allreduce of
m_b = 8 (1 + 2 C) bytes (a flag, then A and B per cell; the default
ParamGradReduction::local adds no channel sums). With alpha the cost of a
step and beta the cost of a byte:

  allgather, recursive doubling / Bruck (Open MPI's choice for small data):
      T = alpha * ceil(log2 P) + beta * (P - 1) * m
  allreduce, recursive doubling (small data):
      T = ceil(log2 P) * (alpha + beta * m)

The alternative to the allgather is an allreduce of packed per-cell sums
(count, sum and sum of squares of x - shift, in double), whose payload m_f
does not grow with P and needs no P-fold merge.

Fitted to the measurements (tests/cluster/coll_bench over the emulated hosts):
  - "busy" waits with 2 ranks on 2 hosts (the only case where ranks fit the 2
    cores and Open MPI's busy polling measures the network stack): alpha and
    beta from 3 payloads, validated on the other 3;
  - "nap" waits (MPI_Test and 10 us sleeps) on 2 and 4 hosts, one rank each,
    validated on 8 hosts: this is where ceil(log2 P) and (P - 1) are tested.
    Its alpha includes the wake-up of a sleeping rank on a loaded machine.

Projection (weak scaling: every rank keeps the given shape, the global H
grows with P), efficiency = compute / (compute + forward and backward
collectives) per training step, for three set-ups:
  - "nccl-ib": one H100 per rank, NCCL over InfiniBand (400 Gb/s per GPU, 8
    GPUs per node); NCCL's own latency model (src/graph/tuning.cc of
    NVIDIA/nccl: ring allgather, tree allreduce, LL protocol);
  - "mpi-eth-gpu": one H100 per rank, Open MPI over TCP on 25 GbE, 1 GPU per
    node (alpha 15 us per step: ~10 us tuned MPI-over-TCP half round trip,
    21 us measured on 10 GbE end to end);
  - "mpi-eth-cpu": distgn's CPU backend, one rank per node, Open MPI over 25
    GbE, compute at the rates docs/performance.md measured on this machine.
Every constant is in CONSTANTS below with its source.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from scipy.optimize import nnls

CONSTANTS = {
    "gpu_hbm_bytes_per_s": {
        "value": 0.8 * 3.35e12,
        "source": "H100 SXM HBM3 3.35 TB/s (NVIDIA's H100 SXM figure, e.g. as quoted in "
                  "https://github.com/scaleway/docs-content/pull/5834), 80% of it assumed achieved",
    },
    "gpu_fixed_us": {
        "value": 20.0,
        "source": "assumption: the GPU path's small host<->device copies around the collective "
                  "(partial statistics down, statistics up, the NCCL communicator's staging: docs/cuda.md) "
                  "and kernel launches, about 20 us per forward+backward",
    },
    "cpu_fwd_model_bytes_per_s": {
        "value": 28.1e9,
        "source": "docs/performance.md, 8x64x64x320 NHWC forward on this 2-core machine (model bytes 2 E s)",
    },
    "cpu_bwd_model_bytes_per_s": {
        "value": 26.5e9,
        "source": "docs/performance.md, same shape, backward (model bytes 3 E s)",
    },
    "eth_alpha_us": {
        "value": 15.0,
        "source": "MPI over kernel TCP: ~10 us half round trip tuned (J. Squyres, 'This ain't your father's TCP', "
                  "Cisco HPC blog; mirror https://fr.hi-network.com/aint-your-fathers-tcp.html) and 21 us "
                  "end to end on 10 GbE (Hurwitz & Feng, Hot Interconnects 2003, "
                  "https://docslib.org/doc/3477667/initial-end-to-end-performance-evaluation-of-10-gigabit-ethernet)",
    },
    "eth_bytes_per_s": {
        "value": 0.9 * 25e9 / 8,
        "source": "25 GbE line rate, 90% assumed achieved by TCP",
    },
    "nccl": {
        "value": {"base_ring_ll_us": 3.6, "base_tree_ll_us": 4.4, "net_ring_ll_us": 2.7, "net_tree_ll_us": 5.0,
                  "nvlink_ring_ll_us": 0.47, "nvlink_tree_ll_us": 0.52, "intra_ll_factor_multinode": 1.8,
                  "gpus_per_node": 8, "nic_bytes_per_s": 400e9 / 8, "ll_bw_fraction": 0.25},
        "source": "NVIDIA/nccl src/graph/tuning.cc (commit 01afd20a77b5804e0ecf1042509dd9d20ebf9e93): baseLat "
                  "Tree/Ring LL 4.4/3.6 us, hwLat NET Tree/Ring LL 5.0/2.7 us, NVLink LL 0.52/0.47 us, intra LL "
                  "latency x1.8 across nodes, ring LL bus bandwidth /4; 400 Gb/s per GPU: NVIDIA HGX AI Factory "
                  "reference architecture (https://docs.nvidia.com/reference-architectures/"
                  "hgx-ai-factory-h100-h200-b200/abstract.md)",
    },
    "merge_ns_default": {
        "value": 3.2,
        "source": "tests/cluster/merge_bench (the library's merge_in_rank_order) on this machine, 32 cells; "
                  "replaced by nodes.json's merge records when present",
    },
}

SHAPES = [
    ("SD-VAE decoder GroupNorm", [1, 512, 128, 128]),
    ("SD-VAE decoder GroupNorm, full resolution", [1, 128, 1024, 1024]),
    ("3-D science model", [1, 32, 256, 256, 256]),
]
G = 32
PROJECT_P = [64, 256, 1024]


def load(path):
    if path.endswith(".jsonl"):
        return [json.loads(l) for l in open(path)], {}
    doc = json.load(open(path))
    return doc["records"], doc


def log2c(p):
    return math.ceil(math.log2(p)) if p > 1 else 0


def design(op, p, m):
    """Row of the linear model T = alpha * a + beta * b."""
    if op == "allgather":
        return [log2c(p), (p - 1) * m]
    return [log2c(p), log2c(p) * m]


def fit(points):
    """alpha, beta >= 0 minimizing the relative error over (op, P, m, T) points."""
    a = np.array([design(op, p, m) for op, p, m, _ in points], dtype=float)
    t = np.array([t for *_, t in points], dtype=float)
    x, _ = nnls(a / t[:, None], np.ones_like(t))
    return x


def rel_errors(x, points):
    return [abs((np.dot(design(op, p, m), x) - t) / t) for op, p, m, t in points]


def summary(errs):
    return {"n": len(errs), "median_abs_rel_err": float(np.median(errs)) if errs else None,
            "max_abs_rel_err": float(np.max(errs)) if errs else None}


def fits(recs):
    out = []
    coll = [r for r in recs if r.get("kind") == "coll" and r.get("ranks_per_host") == 1]
    for pass_ in ["unlimited", "rate"]:
        for op in ["allgather", "allreduce"]:
            # busy: P = 2 on 2 hosts; hold out every other payload
            pts = sorted([(op, r["ranks"], r["payload_bytes"], r["median_us"] * 1e-6) for r in coll
                          if r["pass"] == pass_ and r["op"] == op and r.get("wait") == "busy" and r["hosts"] == 2],
                         key=lambda q: q[2])
            if len(pts) >= 4:
                train, test = pts[0::2], pts[1::2]
                x = fit(train)
                out.append({"wait": "busy", "pass": pass_, "op": op, "alpha_us": x[0] * 1e6,
                            "bandwidth_GBps": (1 / x[1] / 1e9) if x[1] > 0 else None,
                            "train": "P=2, payloads " + ",".join(str(q[2]) for q in train),
                            "held_out": "P=2, payloads " + ",".join(str(q[2]) for q in test),
                            "train_err": summary(rel_errors(x, train)), "held_out_err": summary(rel_errors(x, test))})
            # nap: train on 2 and 4 hosts, hold out 8
            pts = [(op, r["ranks"], r["payload_bytes"], r["median_us"] * 1e-6) for r in coll
                   if r["pass"] == pass_ and r["op"] == op and r.get("wait") == "nap" and r["hosts"] >= 2]
            train = [q for q in pts if q[1] in (2, 4)]
            test = [q for q in pts if q[1] == 8]
            if len(train) >= 4 and test:
                x = fit(train)
                out.append({"wait": "nap", "pass": pass_, "op": op, "alpha_us": x[0] * 1e6,
                            "bandwidth_GBps": (1 / x[1] / 1e9) if x[1] > 0 else None,
                            "train": "P=2,4 (1 rank per host), all payloads", "held_out": "P=8 on 8 hosts",
                            "train_err": summary(rel_errors(x, train)), "held_out_err": summary(rel_errors(x, test)),
                            "held_out_points": [{"P": p, "bytes": m, "measured_us": t * 1e6,
                                                 "model_us": float(np.dot(design(o, p, m), x)) * 1e6}
                                                for o, p, m, t in test]})
    return out


def merge_ns(recs):
    m = [r for r in recs if r.get("kind") == "merge" and r["cells"] == 32 and r["ranks"] >= 64]
    if m:
        return float(np.median([r["ns_per_merge"] for r in m])), "measured: nodes.json merge records (32 cells)"
    return CONSTANTS["merge_ns_default"]["value"], CONSTANTS["merge_ns_default"]["source"]


# ---- projection -------------------------------------------------------------------------

def nccl_allgather_s(p, m):
    c = CONSTANTS["nccl"]["value"]
    nodes = max(1, p // c["gpus_per_node"])
    intra = c["nvlink_ring_ll_us"] * (c["intra_ll_factor_multinode"] if nodes > 1 else 1)
    steps, inter = p - 1, nodes - 1
    lat = c["base_ring_ll_us"] + (steps - inter) * intra + inter * c["net_ring_ll_us"]
    bw = c["nic_bytes_per_s"] * c["ll_bw_fraction"]
    return lat * 1e-6 + (p - 1) * m / bw


def nccl_allreduce_s(p, m):
    c = CONSTANTS["nccl"]["value"]
    nodes = max(1, p // c["gpus_per_node"])
    ppn = min(p, c["gpus_per_node"])
    intra = c["nvlink_tree_ll_us"] * (c["intra_ll_factor_multinode"] if nodes > 1 else 1)
    lat = c["base_tree_ll_us"] + 2 * ((ppn - 1) * intra + log2c(nodes) * c["net_tree_ll_us"])
    bw = c["nic_bytes_per_s"] * c["ll_bw_fraction"]
    return lat * 1e-6 + 2 * m / bw


def mpi_s(op, p, m, alpha_s, beta_s):
    return float(np.dot(design(op, p, m), [alpha_s, beta_s]))


def compute_s(setup, elements):
    s = 4  # float32
    if setup == "mpi-eth-cpu":
        return (2 * elements * s / CONSTANTS["cpu_fwd_model_bytes_per_s"]["value"]
                + 3 * elements * s / CONSTANTS["cpu_bwd_model_bytes_per_s"]["value"])
    # the distributed GPU path: stats read x, normalize reads x writes y; backward sums read x, dy,
    # dx reads x, dy, writes dx
    return (3 + 5) * elements * s / CONSTANTS["gpu_hbm_bytes_per_s"]["value"] + CONSTANTS["gpu_fixed_us"]["value"] * 1e-6


def collectives_s(setup, collective, p, cells, gamma_s):
    m_f, m_b = 8 * (1 + 3 * cells), 8 * (1 + 2 * cells)
    if p == 1:
        return 0.0, 0.0
    if setup == "nccl-ib":
        ag, ar = nccl_allgather_s, nccl_allreduce_s
    else:
        a = CONSTANTS["eth_alpha_us"]["value"] * 1e-6
        b = 1 / CONSTANTS["eth_bytes_per_s"]["value"]
        ag = lambda p_, m_: mpi_s("allgather", p_, m_, a, b)  # noqa: E731
        ar = lambda p_, m_: mpi_s("allreduce", p_, m_, a, b)  # noqa: E731
    fwd = ag(p, m_f) + gamma_s * p * cells if collective == "allgather" else ar(p, m_f)
    return fwd, ar(p, m_b)


def project(gamma_s):
    rows = []
    for name, shape in SHAPES:
        elements = math.prod(shape)
        cells = shape[0] * G
        for setup in ["nccl-ib", "mpi-eth-gpu", "mpi-eth-cpu"]:
            comp = compute_s(setup, elements)
            for collective in ["allgather", "allreduce"]:
                row = {"shape": shape, "name": name, "setup": setup, "collective": collective,
                       "compute_us": comp * 1e6, "cells": cells, "by_P": {}}
                for p in PROJECT_P:
                    fwd, bwd = collectives_s(setup, collective, p, cells, gamma_s)
                    row["by_P"][p] = {"fwd_coll_us": fwd * 1e6, "bwd_coll_us": bwd * 1e6,
                                      "efficiency": comp / (comp + fwd + bwd)}
                rows.append(row)
    return rows


MARGIN = 1.10  # the allgather must cost 10% more than the allreduce for the switch to pay


def first_p(cost_ag, cost_ar):
    """Smallest power-of-two P >= 2 at which cost_ag(P) > MARGIN * cost_ar(P) (None up to 65536)."""
    p = 2
    while p <= 1 << 16:
        if cost_ag(p) > MARGIN * cost_ar(p):
            return p
        p *= 2
    return None


def crossover(setup, cells, gamma_s):
    return first_p(lambda p: collectives_s(setup, "allgather", p, cells, gamma_s)[0],
                   lambda p: collectives_s(setup, "allreduce", p, cells, gamma_s)[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nodes", nargs="?", default="bench-results/nodes/nodes.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    recs, doc = load(args.nodes)
    out = args.out or os.path.dirname(os.path.abspath(args.nodes))
    fitted = fits(recs)
    gamma_ns, gamma_src = merge_ns(recs)
    gamma_s = gamma_ns * 1e-9

    print("alpha-beta fits to the emulated hosts (T in the model above; errors are |model - measured| / measured)")
    print("%-5s %-9s %-9s %10s %10s  %-22s %-22s" % ("wait", "link", "op", "alpha us", "1/beta GB/s",
                                                    "train err med/max", "held-out err med/max"))
    for f in fitted:
        print("%-5s %-9s %-9s %10.1f %10s  %9.0f%% / %5.0f%%     %9.0f%% / %5.0f%%   (held out: %s)" % (
            f["wait"], f["pass"], f["op"], f["alpha_us"],
            "%.2f" % f["bandwidth_GBps"] if f["bandwidth_GBps"] else "inf",
            100 * f["train_err"]["median_abs_rel_err"], 100 * f["train_err"]["max_abs_rel_err"],
            100 * f["held_out_err"]["median_abs_rel_err"], 100 * f["held_out_err"]["max_abs_rel_err"], f["held_out"]))
    print("\nmerge after the allgather: gamma = %.2f ns per Chan merge (%s)" % (gamma_ns, gamma_src))

    rows = project(gamma_s)
    print("\nprojected weak-scaling efficiency, compute / (compute + collectives) per forward+backward, "
          "float32, G = 32, per-rank shard = the shape (sharded along H)")
    print("%-22s %-12s %-10s %11s" % ("shape", "set-up", "fwd coll", "compute us") +
          "".join("%22s" % ("P=%d eff (coll us)" % p) for p in PROJECT_P))
    for r in rows:
        line = "%-22s %-12s %-10s %11.1f" % ("x".join(map(str, r["shape"])), r["setup"], r["collective"], r["compute_us"])
        for p in PROJECT_P:
            q = r["by_P"][p]
            line += "%22s" % ("%5.1f%% (%.0f+%.0f)" % (100 * q["efficiency"], q["fwd_coll_us"], q["bwd_coll_us"]))
        print(line)

    cross = {}
    print("\nwhere the allreduce of packed sums should take over the allgather of moments (forward collective "
          "incl. the P-fold merge; first power of two P where the allgather costs > %d%% more):" % round(100 * (MARGIN - 1)))
    for setup in ["nccl-ib", "mpi-eth-gpu"]:
        for cells in [32, 1024, 32768]:
            p = crossover(setup, cells, gamma_s)
            cross["%s/%d" % (setup, cells)] = p
            print("  %-12s %6d cells: P >= %s" % (setup, cells, p))
    for f in fitted:
        if f["wait"] == "busy" and f["pass"] == "unlimited" and f["op"] == "allgather":
            a, b = f["alpha_us"] * 1e-6, 1 / (f["bandwidth_GBps"] * 1e9) if f["bandwidth_GBps"] else 0
            for cells in [32, 1024, 32768]:
                m = 8 * (1 + 3 * cells)
                p = first_p(lambda p_: mpi_s("allgather", p_, m, a, b) + gamma_s * p_ * cells,
                            lambda p_: mpi_s("allreduce", p_, m, a, b))
                cross["emulated-busy/%d" % cells] = p
                print("  %-12s %6d cells: P >= %s   (this machine's emulated network, busy-wait fit)" % (
                    "emulated", cells, p))

    model = {"constants": CONSTANTS, "merge_ns": gamma_ns, "merge_source": gamma_src, "fits": fitted,
             "projection": rows, "crossover_P": cross, "input": os.path.abspath(args.nodes),
             "measured_context": {k: doc.get(k) for k in ("shared", "emulated", "machine")}}
    json.dump(model, open(os.path.join(out, "model.json"), "w"), indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    ps = [2 ** k for k in range(1, 13)]
    for ax, (name, shape) in zip(axes, SHAPES):
        elements, cells = math.prod(shape), shape[0] * G
        for setup, color in [("nccl-ib", "#4c72b0"), ("mpi-eth-gpu", "#dd8452"), ("mpi-eth-cpu", "#55a868")]:
            comp = compute_s(setup, elements)
            for collective, style in [("allgather", "-"), ("allreduce", "--")]:
                eff = [comp / (comp + sum(collectives_s(setup, collective, p, cells, gamma_s))) for p in ps]
                ax.plot(ps, eff, style, color=color, label=f"{setup}, fwd {collective}")
        ax.set_xscale("log", base=2)
        ax.set_title("%s %s (per rank)" % (name, "x".join(map(str, shape))), fontsize=9)
        ax.set_xlabel("ranks (weak scaling)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("efficiency: compute / (compute + collectives)")
    axes[0].legend(fontsize=7)
    fig.suptitle("MODEL, not measured: alpha-beta with published constants (NCCL tuning.cc, 25 GbE TCP), "
                 "H100 at 80%% of 3.35 TB/s, CPU at this machine's rates; merge %.1f ns x P x C" % gamma_ns, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "model_efficiency.png"), dpi=110)
    print("\nwrote", os.path.join(out, "model.json"), "and", os.path.join(out, "model_efficiency.png"))


if __name__ == "__main__":
    sys.exit(main())
