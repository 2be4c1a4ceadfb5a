#!/usr/bin/python3
"""A small PyTorch model trained with DDP over D replicas x P spatial shards,
every GroupNorm a distgn.torch.GroupNorm over its spatial group: the PyTorch
twin of build/train_digits (docs/training.md), on scikit-learn's digits.

World rank w is spatial shard p = w % P of replica d = w // P. A global batch
of B images is split into D slices of B/D; every rank of a replica holds its
rows of each image of the slice (the 8 rows split as numpy.array_split does).
The model works on each pixel alone (1x1 convolutions), so a shard needs no
halo, and pools by a sum over the spatial group:

  x[pixel] = [v, row one-hot (8), column one-hot (8), v * row one-hot, v * column one-hot],  v = intensity / 16
  2 x ( conv 1x1, 32 channels -> distgn.torch.GroupNorm(8, 32, process_group=spatial group) -> SiLU )
  mean over the 64 pixels (torch.distributed.nn.all_reduce over the spatial group) -> linear 32 -> 10
  -> cross-entropy, mean over the replica's slice

DDP averages every gradient over the D x P ranks. The GroupNorms' weight and
bias gradients are each rank's partial sums (distgn.torch's default, as DDP
expects); the all_reduce of the pooling sums its gradient over the spatial
group on the way back, which makes every rank's share P times its own, and
DDP's mean over D x P ranks brings it back: the update is that of the
global batch's mean loss on one process, whatever the layout.

Its own launcher (Debian's torchrun 1.13 fails under Python 3.11): it starts
the D x P ranks with torch.multiprocessing over gloo, rendezvous through
env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); under a launcher that
sets RANK and WORLD_SIZE (mpirun with those set, a working torchrun) it runs
as that rank instead.

  scripts/train_torch.py                              # layouts 1x1, 2x1, 1x2, 2x2; final losses agree
  scripts/train_torch.py --layouts 2x2 --epochs 5
  scripts/train_torch.py --steps 3 --dtype float64 --json out.json   # a quick check (tests/python)
"""
import argparse
import datetime
import faulthandler
import json
import math
import os
import socket
import sys
import tempfile
import time

ROWS = COLS = 8
CLASSES = 10


def parse_layouts(text):
    layouts = []
    for item in text.split(","):
        try:
            d, p = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"train_torch: a layout is DxP (replicas x spatial shards), not {item!r}")
        if d < 1 or not 1 <= p <= ROWS:
            raise SystemExit(f"train_torch: layout {item}: D >= 1 and 1 <= P <= {ROWS} (the image has {ROWS} rows)")
        layouts.append((d, p))
    return layouts


def row_range(p, parts):
    """numpy.array_split's rows of shard p."""
    q, r = divmod(ROWS, parts)
    start = p * q + min(p, r)
    return start, start + q + (p < r)


def features(torch, images):
    """(n, 33, 8, 8) per-pixel features of (n, 64) intensities 0..16."""
    v = (images.reshape(-1, 1, ROWS, COLS) / 16.0)
    n = v.shape[0]
    row = torch.eye(ROWS, dtype=v.dtype).reshape(1, ROWS, ROWS, 1).expand(n, ROWS, ROWS, COLS)
    col = torch.eye(COLS, dtype=v.dtype).reshape(1, COLS, 1, COLS).expand(n, COLS, ROWS, COLS)
    return torch.cat([v, row, col, v * row, v * col], 1)


def load_digits(torch, seed, dtype):
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    images = torch.tensor(data.data, dtype=torch.float64)
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    x = features(torch, images).to(dtype)
    return (x[train], labels[train]), (x[test], labels[test])


def make_model(torch, dgn, args, group, dtype):
    from torch import nn

    torch.manual_seed(args.seed)  # the same initial weights on every rank and layout

    class Pool(nn.Module):
        """Mean over the image's 64 pixels: a sum over this shard's, then over the spatial group."""

        def forward(self, h):
            s = h.sum((2, 3))
            if group is not None:
                import torch.distributed.nn as dist_nn

                s = dist_nn.all_reduce(s, group=group)
            return s / (ROWS * COLS)

    def norm():
        return dgn.GroupNorm(args.groups, args.width, process_group=group)

    layers, width_in = [], 4 * ROWS + 1
    for _ in range(args.blocks):
        layers += [nn.Conv2d(width_in, args.width, 1), norm(), nn.SiLU()]
        width_in = args.width
    layers += [Pool(), nn.Linear(args.width, CLASSES)]
    return nn.Sequential(*layers).to(dtype)


def train_rank(rank, world, d_count, p_count, args, out_path):
    """One rank's run; rank 0 writes the result to out_path."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import distgn.torch as dgn

    faulthandler.dump_traceback_later(args.timeout, exit=True)  # a hang ends the rank, with its stacks
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        replica, shard = rank // p_count, rank % p_count
        group = None
        for d in range(d_count):  # every rank makes every spatial group, in the same order
            g = dist.new_group(list(range(d * p_count, (d + 1) * p_count))) if p_count > 1 else None
            if d == replica:
                group = g
        (x_train, y_train), (x_test, y_test) = load_digits(torch, args.seed, dtype)
        r0, r1 = row_range(shard, p_count)
        x_train, x_test = x_train[:, :, r0:r1].contiguous(), x_test[:, :, r0:r1].contiguous()
        if args.channels_last:
            x_train = x_train.contiguous(memory_format=torch.channels_last)
            x_test = x_test.contiguous(memory_format=torch.channels_last)
        model = DDP(make_model(torch, dgn, args, group, dtype))
        steps_per_epoch = len(y_train) // args.batch
        total = args.steps if args.steps else args.epochs * steps_per_epoch
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        slice_size = args.batch // d_count
        losses, epoch_losses, step = [], [], 0
        start = time.perf_counter()
        while step < total:
            epoch = step // steps_per_epoch
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            epoch_sum, epoch_steps = torch.zeros((), dtype=torch.float64), 0
            for i in range(steps_per_epoch):
                if step >= total:
                    break
                batch = order[i * args.batch:(i + 1) * args.batch]
                mine = batch[replica * slice_size:(replica + 1) * slice_size]
                loss = torch.nn.functional.cross_entropy(model(x_train[mine]), y_train[mine])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                epoch_steps += 1
                epoch_sum += loss.detach().double()
                losses.append(loss.detach().double())
            # the global batch's loss: the replicas' mean (the P ranks of a replica hold the same)
            epoch_sum /= p_count
            dist.all_reduce(epoch_sum)
            epoch_losses.append(epoch_sum.item() / d_count / epoch_steps)
            if rank == 0 and not args.steps:
                print(f"  {d_count}x{p_count} epoch {epoch + 1}: train loss {epoch_losses[-1]:.7f}", flush=True)
        seconds = time.perf_counter() - start
        step_losses = torch.stack(losses) / p_count
        dist.all_reduce(step_losses)
        step_losses /= d_count
        with torch.no_grad():  # test set: every replica evaluates all of it, on its rows
            logits = model.module(x_test)
            correct = int((logits.argmax(1) == y_test).sum())
            test_loss = torch.nn.functional.cross_entropy(logits, y_test).item()
        if rank == 0:
            result = {"dp": d_count, "sp": p_count, "ranks": world, "steps": step, "dtype": args.dtype,
                      "step_losses": step_losses.tolist(), "final_loss": step_losses[-1].item(),
                      "epoch_losses": epoch_losses, "test_loss": test_loss,
                      "test_accuracy": correct / len(y_test), "test_correct": correct, "test_size": len(y_test),
                      "ms_per_step": 1e3 * seconds / max(1, step)}
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _spawned(rank, port, world, d_count, p_count, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    train_rank(rank, world, d_count, p_count, args, out_path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(d_count, p_count, args, out_path):
    """The D x P ranks as processes of this machine; fails (never waits
    forever) if one fails or the whole run exceeds --timeout."""
    import torch.multiprocessing as mp

    world = d_count * p_count
    ctx = mp.start_processes(_spawned, args=(_free_port(), world, d_count, p_count, args, out_path),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + args.timeout + 30
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise SystemExit(f"train_torch: layout {d_count}x{p_count} did not finish within {args.timeout + 30} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="comma-separated DxP (replicas x shards)")
    parser.add_argument("--dp", type=int, help="one layout: D (with --sp)")
    parser.add_argument("--sp", type=int, help="one layout: P (with --dp)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (default: --epochs)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (a multiple of every D)")
    parser.add_argument("--lr", type=float, default=0.1, help="decayed to 0 by a cosine")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--channels-last", action="store_true", help="activations in channels_last memory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a layout's run fails")
    parser.add_argument("--json", help="write every layout's result here")
    args = parser.parse_args()
    layouts = [(args.dp, args.sp)] if args.dp or args.sp else parse_layouts(args.layouts)
    if any(v is None or v < 1 for v in layouts[0]):
        raise SystemExit("train_torch: --dp and --sp go together, each >= 1")
    for d, p in layouts:
        if args.batch % d:
            raise SystemExit(f"train_torch: the global batch {args.batch} is not a multiple of D = {d}")

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by an outside launcher: one layout
        d, p = layouts[0]
        world = int(os.environ["WORLD_SIZE"])
        if world != d * p:
            raise SystemExit(f"train_torch: WORLD_SIZE {world} is not D x P = {d * p}")
        out = args.json or os.devnull
        train_rank(int(os.environ["RANK"]), world, d, p, args, out)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for d, p in layouts:
            out = os.path.join(tmp, f"{d}x{p}.json")
            launch(d, p, args, out)
            with open(out) as f:
                results.append(json.load(f))
    ref = results[0]
    print(f"digits, {args.dtype}, global batch {args.batch}, {ref['steps']} steps, SGD lr {args.lr} "
          f"momentum {args.momentum}, seed {args.seed}, {args.threads} thread(s) per rank")
    print(f"{'D x P':7} {'ranks':>5} {'final loss':>14} {'max rel diff':>12} {'test acc':>16} {'ms/step':>8}")
    worst = 0.0
    for r in results:
        diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["step_losses"], ref["step_losses"]))
        r["max_rel_diff_vs_first"] = diff
        worst = max(worst, diff)
        print(f"{r['dp']}x{r['sp']:<5} {r['ranks']:>5} {r['final_loss']:>14.9f} {diff:>12.2e} "
              f"{100 * r['test_accuracy']:>7.2f}% ({r['test_correct']}/{r['test_size']}) {r['ms_per_step']:>8.2f}")
    print(f"every step's loss: largest relative difference from {ref['dp']}x{ref['sp']}'s {worst:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
