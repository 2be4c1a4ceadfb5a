#!/usr/bin/python3
"""Plots bench_scaling.sh's JSON lines: forward and backward time per call
against ranks, split into compute and the collective, weak and strong
scaling side by side; prints the table the plot shows.

  scripts/plot_scaling.py bench-results      # writes bench-results/scaling.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "bench-results"
    modes = [(m, load(os.path.join(out, "scaling_%s.jsonl" % m))) for m in ("weak", "strong")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    print("%-6s %5s %-18s %9s %9s %9s %9s %9s" % ("mode", "ranks", "global shape", "fwd ms", "comm ms",
                                                  "bwd ms", "lat us", "fwd/copy"))
    for ax, (mode, rows) in zip(axes, modes):
        rows = sorted(rows, key=lambda r: r["ranks"])
        ranks = [r["ranks"] for r in rows]
        comm = [r["comm_us"] / 1e3 for r in rows]
        fwd_compute = [max(0.0, r["fwd_ms"] - c) for r, c in zip(rows, comm)]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], fwd_compute, 0.4, label="forward: compute", color="#4c72b0")
        ax.bar([x - 0.2 for x in xs], comm, 0.4, bottom=fwd_compute, label="forward: in collective",
               color="#dd8452")
        ax.bar([x + 0.2 for x in xs], [r["bwd_ms"] for r in rows], 0.4, label="backward (1 collective)",
               color="#55a868")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(["%d%s" % (p, "*" if r["oversubscribed"] else "") for p, r in zip(ranks, rows)])
        ax.set_xlabel("ranks (* = more ranks than cores)")
        ax.set_ylabel("ms per call (slowest rank, median)")
        shape = rows[0]["shape"] if rows else []
        ax.set_title("%s scaling%s" % (mode, "" if not rows else
                     (", shard %s per rank" % "x".join(map(str, [shape[0], shape[1] // max(1, rows[0]["ranks"])] + shape[2:]))
                      if mode == "weak" else ", global %s" % "x".join(map(str, shape)))))
        ax.legend(fontsize=8)
        for r, c in zip(rows, comm):
            print("%-6s %5d %-18s %9.3f %9.3f %9.3f %9.1f %8.0f%%" % (
                mode, r["ranks"], "x".join(map(str, r["shape"])), r["fwd_ms"], c, r["bwd_ms"],
                r.get("collective_latency_us", 0.0), 100 * r["fwd_gbps"] / r["copy_gbps"]))
    fig.tight_layout()
    path = os.path.join(out, "scaling.png")
    fig.savefig(path, dpi=110)
    print("plot: %s" % path)


if __name__ == "__main__":
    main()
