"""distgn.torch over torch.distributed: 4 CPU processes over gloo, rendezvous
through env:// (MASTER_ADDR / MASTER_PORT, what torchrun sets), launched with
torch.multiprocessing. Sharded results equal the single-process ones on the
concatenated tensor; exactly one collective per forward and per backward."""
import datetime
import faulthandler
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import distgn.torch as dgn

WORLD = 4
COLLECTIVES = ["all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "all_to_all", "gather", "scatter", "reduce", "barrier"]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def split_sizes(total, parts):
    """numpy.array_split's sizes."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


class Counter:
    """Counts the torch.distributed collectives distgn calls (it looks them up at each call)."""

    def __init__(self, monkey):
        self.calls = []
        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is None:
                continue
            monkey.append((name, real))
            setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def single_and_sharded(rank, x, sizes, axis, weight, bias, dy, fmt, **kw):
    """(reference y, dx, dw, db on the whole x; this rank's shard's y, dx, dw, db)."""
    xr = x.detach().clone().to(memory_format=fmt).requires_grad_()
    wr, br = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    yr = dgn.group_norm(xr, 4, wr, br, **kw)
    yr.backward(dy)
    start = sum(sizes[:rank])
    sl = [slice(None)] * x.dim()
    sl[axis] = slice(start, start + sizes[rank])
    xs = x.detach()[tuple(sl)].clone().to(memory_format=fmt).requires_grad_()
    ws, bs = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ys = dgn.group_norm(xs, 4, ws, bs, process_group=dist.group.WORLD, **kw)
    ys.backward(dy[tuple(sl)].to(memory_format=fmt))
    return (yr[tuple(sl)], xr.grad[tuple(sl)], wr.grad, br.grad), (ys, xs.grad, ws.grad, bs.grad)


def scenario_sharded_equals_single(rank, log):
    for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for sizes in ([3, 3, 3, 3], [5, 0, 3, 4], [1, 2, 0, 9]):
                g = torch.Generator().manual_seed(10)
                x = torch.randn(2, 8, sum(sizes), 5, generator=g, dtype=dtype) * 2 + 0.5
                dy = torch.randn(x.shape, generator=g, dtype=dtype)
                w = torch.rand(8, generator=g, dtype=dtype) + 0.5
                b = torch.rand(8, generator=g, dtype=dtype)
                ref, got = single_and_sharded(rank, x, sizes, 2, w, b, dy, fmt)
                errors = [rel_err(got[0], ref[0]), rel_err(got[1], ref[1])] if sizes[rank] else [0.0, 0.0]
                # dweight/dbias: each rank's partial sums; their total is the whole tensor's
                for k in (2, 3):
                    total = got[k].clone()
                    dist.all_reduce(total)
                    errors.append(rel_err(total, ref[k]))
                # and against torch itself on the whole tensor
                if sizes[rank]:
                    start = sum(sizes[:rank])
                    yt = F.group_norm(x, 4, w, b, 1e-5)[:, :, start:start + sizes[rank]]
                    errors.append(rel_err(got[0], yt))
                assert max(errors) < tol, (dtype, fmt, sizes, errors)
                assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
                log.append(f"{dtype} {fmt} shards {sizes}: max error {max(errors):.2e}")


def scenario_half_dtypes(rank, log):
    """float16 / bfloat16 shards: within a unit in the last place of the single-process run."""
    for dtype, ulp in [(torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            sizes = [2, 3, 0, 3]
            g = torch.Generator().manual_seed(13)
            x = torch.randn(2, 8, sum(sizes), 4, generator=g).to(dtype)
            dy = torch.randn(x.shape, generator=g).to(dtype)
            w = (torch.rand(8, generator=g) + 0.5).to(dtype)
            b = torch.rand(8, generator=g).to(dtype)
            ref, got = single_and_sharded(rank, x, sizes, 2, w, b, dy, fmt)
            errors = [rel_err(got[0], ref[0]), rel_err(got[1], ref[1])] if sizes[rank] else [0.0, 0.0]
            assert got[0].dtype == dtype and got[1].dtype == dtype
            assert max(errors) < 2 * ulp, (dtype, fmt, errors)
    log.append("float16, bfloat16 shards: ok")


def scenario_masked_and_reduced_param_grads(rank, log):
    g = torch.Generator().manual_seed(11)
    sizes = [2, 4, 0, 3]
    x = torch.randn(3, 8, 4, sum(sizes), generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w, b = torch.rand(8, generator=g, dtype=torch.float64), torch.rand(8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 1, 4, sum(sizes), generator=g) > 0.4
    start = sum(sizes[:rank])
    sl = (slice(None), slice(None), slice(None), slice(start, start + sizes[rank]))
    xr = x.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    yr = dgn.group_norm(xr, 4, wr, br, mask=mask, use_fast_variance=False)
    yr.backward(dy)
    xs = x[sl].clone().requires_grad_()
    ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
    ys = dgn.group_norm(xs, 4, ws, bs, mask=mask[sl], use_fast_variance=False, process_group=dist.group.WORLD,
                        reduce_param_grads=True)
    ys.backward(dy[sl])
    if sizes[rank]:
        assert rel_err(ys, yr[sl]) < 1e-12 and rel_err(xs.grad, xr.grad[sl]) < 1e-12
    # reduce_param_grads: every rank holds the whole tensor's dweight/dbias
    assert rel_err(ws.grad, wr.grad) < 1e-12 and rel_err(bs.grad, br.grad) < 1e-12
    log.append("masked, exact variance, reduce_param_grads: ok")


def scenario_one_collective_per_call(rank, log):
    monkey = []
    counter = Counter(monkey)
    try:
        layer = dgn.GroupNorm(4, 8, process_group=dist.group.WORLD)
        for fmt in (torch.contiguous_format, torch.channels_last):
            for step in range(3):
                x = torch.randn(2, 8, 3 + rank, 4).to(memory_format=fmt).requires_grad_()
                y = layer(x)
                fwd = counter.take()
                y.backward(torch.randn_like(y))
                bwd = counter.take()
                if step == 0:  # a new input: the ranks first agree on it (one more all_gather)
                    log.append(f"{fmt} first call: forward {fwd}, backward {bwd}")
                    assert len(fwd) <= 2 and bwd == ["all_reduce"], (fwd, bwd)
                else:
                    assert fwd == ["all_gather"] and bwd == ["all_reduce"], (fwd, bwd)
        log.append("steady state: 1 collective per forward (all_gather), 1 per backward (all_reduce)")
    finally:
        for name, real in monkey:
            setattr(dist, name, real)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g


class _GatherShards(torch.autograd.Function):
    """Forward: every rank's shard joined along `axis` (sizes known); backward:
    this rank's part of the gradient (the same on every rank)."""
    @staticmethod
    def forward(ctx, y, sizes, axis, rank):
        ctx.sizes, ctx.axis, ctx.rank = sizes, axis, rank
        n = max(sizes)
        shape = list(y.shape)
        shape[axis] = n
        padded = y.new_zeros(shape)
        padded.narrow(axis, 0, y.shape[axis]).copy_(y)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p.narrow(axis, 0, s) for p, s in zip(parts, sizes)], axis)

    @staticmethod
    def backward(ctx, g):
        start = sum(ctx.sizes[:ctx.rank])
        return g.narrow(ctx.axis, start, ctx.sizes[ctx.rank]).contiguous(), None, None, None


def scenario_gradcheck_sharded(rank, log):
    """gradcheck of the whole sharded computation: every rank sees the whole
    x, takes its shard, runs the distributed layer, and the shards are joined
    again, so every rank evaluates the same function of the same inputs."""
    sizes = [2, 1, 0, 3]
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, sum(sizes), 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.rand(4, generator=g, dtype=torch.float64).requires_grad_()
    start = sum(sizes[:rank])

    def f(x, w, b):
        x, w, b = _AllReduceGrad.apply(x), _AllReduceGrad.apply(w), _AllReduceGrad.apply(b)
        xs = x.narrow(2, start, sizes[rank])
        ys = dgn.group_norm(xs, 2, w, b, process_group=dist.group.WORLD)
        return _GatherShards.apply(ys, sizes, 2, rank)

    assert torch.autograd.gradcheck(f, (x, w, b))
    log.append("gradcheck of the sharded layer (shards [2, 1, 0, 3]): ok")


def scenario_subgroups(rank, log):
    """axis_index_groups [[0, 2], [1, 3]]: ranks 0, 2 share statistics, 1, 3 others."""
    team = rank % 2
    g = torch.Generator().manual_seed(20 + team)
    x = torch.randn(2, 8, 6, 3, generator=g, dtype=torch.float64)
    ref = F.group_norm(x, 4, eps=1e-5)
    half = rank // 2
    xs = x[:, :, 3 * half:3 * half + 3].clone().requires_grad_()
    layer = dgn.GroupNorm(4, 8, process_group=dist.group.WORLD, axis_index_groups=[[0, 2], [1, 3]],
                          dtype=torch.float64)
    ys = layer(xs)
    assert rel_err(ys, ref[:, :, 3 * half:3 * half + 3]) < 1e-12
    try:
        dgn.GroupNorm(4, 8, process_group=dist.group.WORLD, axis_index_groups=[[0, 1], [1, 3]])(xs)
        raise AssertionError("no error")
    except ValueError as e:
        assert str(e) == "axis_index_groups must cover all indices exactly once", str(e)
    log.append("subgroups [[0, 2], [1, 3]]: ok; bad groups raise semantics §7's message")


def scenario_disagreeing_ranks_raise_everywhere(rank, log):
    layer = dgn.GroupNorm(4, 8, process_group=dist.group.WORLD)
    layer(torch.randn(2, 8, 3, 3))  # agreed once
    # rank 1 has another batch size: every rank raises
    x = torch.randn(3 if rank == 1 else 2, 8, 3, 3)
    try:
        layer(x)
        raise AssertionError("no error")
    except ValueError as e:
        assert "disagree on what must be shared" in str(e), str(e)
    # rank 2's input is invalid (channels not divisible by the groups): all raise
    bad = dgn.GroupNorm(4, 8, process_group=dist.group.WORLD)
    try:
        bad(torch.randn(2, 8, 3), mask=torch.ones(2, 8, 4, dtype=torch.bool) if rank == 2 else None)
        raise AssertionError("no error")
    except ValueError as e:
        msg = str(e)
        assert ("rank 2 of this rank's group rejected its input" in msg) if rank != 2 else "mask" in msg, msg
    # and the layer works again afterwards
    y = layer(torch.randn(2, 8, 3, 3))
    assert y.shape == (2, 8, 3, 3)
    log.append("disagreeing and invalid ranks: every rank raises")


def scenario_checks_before_the_layer_raise_everywhere(rank, log):
    """The checks the binding makes before the C++ layer's (channels, dtype,
    mask's rank, x's rank) fail on one rank: every rank raises, none waits."""
    layer = dgn.GroupNorm(4, 8, process_group=dist.group.WORLD)
    good = torch.randn(2, 8, 3, 3)
    layer(good)  # agreed once
    cases = [
        (1, lambda: layer(torch.randn(2, 6 if rank == 1 else 8, 3, 3)), "Expected 8 channels in the input"),
        (3, lambda: layer(good.long() if rank == 3 else good), "distgn supports float32, float64"),
        (0, lambda: layer(good, mask=torch.ones(1, 2, 8, 3, 3, dtype=torch.bool) if rank == 0 else None),
         "does not broadcast"),
        (2, lambda: dgn.group_norm(torch.randn(8) if rank == 2 else good, 4, process_group=dist.group.WORLD),
         "Expected at least 2 dimensions"),
    ]
    for bad_rank, call, message in cases:
        try:
            call()
            raise AssertionError(f"no error (rank {bad_rank}'s {message!r})")
        except ValueError as e:
            assert message in str(e), str(e)
            if rank != bad_rank:
                assert f"rank {bad_rank} of this rank's group rejected its input" in str(e), str(e)
    assert layer(good).shape == good.shape  # and the layer works again afterwards
    log.append("wrong channels, dtype, mask rank, x rank on one rank: every rank raises")


def scenario_ddp_with_spatial_shards(rank, log):
    """DDP over 2 replicas x 2 spatial shards: ranks {0, 1} and {2, 3} each hold
    one replica's batch split along H, every GroupNorm shares statistics over
    its replica's ranks (axis_index_groups), DDP averages the parameter
    gradients (each rank's partial sums) over all 4. The result is the
    single-process gradient of the whole batch's loss, over 4."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def model(**kw):
        torch.manual_seed(30)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), dgn.GroupNorm(4, 8, **kw), torch.nn.SiLU(),
                                   torch.nn.Conv2d(8, 8, 1), dgn.GroupNorm(2, 8, **kw)).double()

    g = torch.Generator().manual_seed(31)
    batch = torch.randn(4, 3, 6, 5, generator=g, dtype=torch.float64)  # replica r: samples 2r, 2r + 1
    weights = torch.randn(4, 8, 6, 5, generator=g, dtype=torch.float64)
    replica, shard = rank // 2, rank % 2
    rows = slice(0, 2) if shard == 0 else slice(2, 6)
    ddp = DDP(model(process_group=dist.group.WORLD, axis_index_groups=[[0, 1], [2, 3]]))
    x = batch[2 * replica:2 * replica + 2, :, rows]
    loss = (ddp(x) * weights[2 * replica:2 * replica + 2, :, rows]).sum()
    loss.backward()
    ref = model()
    (ref(batch) * weights).sum().backward()
    errors = [rel_err(p.grad, q.grad / 4) for p, q in zip(ddp.module.parameters(), ref.parameters())]
    assert max(errors) < 1e-12, errors
    log.append(f"DDP 2 replicas x 2 spatial shards: gradients equal the single process's, max error "
               f"{max(errors):.1e}")


def scenario_subgroups_of_a_subset_group(rank, log):
    """A process group of 3 of the 4 ranks, split by axis_index_groups: only
    its members call the layer (rank 3 does not), so the subgroups must be made
    by their members alone (torch.distributed.new_group, collective over every
    rank, waited here for rank 3). Ranks 0 and 2 of the group share
    statistics, rank 1 is alone; rank 3 calling it raises, alone."""
    group = dist.new_group([0, 1, 2])  # every rank calls new_group, as torch requires
    g = torch.Generator().manual_seed(40)
    x = torch.randn(2, 8, 6, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if rank == 3:
        try:
            dgn.GroupNorm(4, 8, process_group=group)(x)
            raise AssertionError("no error")
        except ValueError as e:
            assert "not a member of the layer's process_group" in str(e), str(e)
        log.append("a rank outside the group raises ValueError")
        return
    # [[0, 2], [1]]: group ranks 0 and 2 (global 0 and 2) hold one half of H each; 1 holds all of it
    sl = (slice(None), slice(None), slice(0, 3) if rank == 0 else slice(3, 6) if rank == 2 else slice(0, 6))
    xr = x.clone().requires_grad_()
    yr = dgn.group_norm(xr, 4, use_fast_variance=False)
    yr.backward(dy)
    for step in range(2):  # the subgroup is made once, then reused
        layer = dgn.GroupNorm(4, 8, process_group=group, axis_index_groups=[[0, 2], [1]], dtype=torch.float64)
        xs = x[sl].clone().requires_grad_()
        ys = layer(xs)
        ys.backward(dy[sl])
        assert rel_err(ys, yr[sl]) < 1e-12 and rel_err(xs.grad, xr.grad[sl]) < 1e-12, step
    log.append("group [0, 1, 2] split [[0, 2], [1]], rank 3 not calling: equals the single process")


def scenario_subgroups_listed_differently(rank, log):
    """The same subgroups listed in another order on ranks 2, 3 than on 0, 1, and
    a second partition sharing one subgroup: each rank's subgroup is its
    members' own, whatever the list's order or the layers' order of creation."""
    g = torch.Generator().manual_seed(41 + rank // 2)
    x = torch.randn(2, 8, 4, 3, generator=g, dtype=torch.float64)
    half = slice(0, 2) if rank % 2 == 0 else slice(2, 4)
    ref = F.group_norm(x, 4, eps=1e-5)[:, :, half]
    lists = [[[0, 1], [2, 3]], [[2, 3], [0, 1]]] if rank < 2 else [[[3, 2], [1, 0]], [[0, 1], [2], [3]]]
    for groups in lists:
        layer = dgn.GroupNorm(4, 8, process_group=dist.group.WORLD, axis_index_groups=groups, dtype=torch.float64)
        y = layer(x[:, :, half].contiguous())
        alone = any(len(gr) == 1 and rank in gr for gr in groups)
        expect = F.group_norm(x[:, :, half], 4, eps=1e-5) if alone else ref
        assert rel_err(y, expect) < 1e-12, groups
    log.append("subgroups listed in other orders on other ranks: ok")


SCENARIOS = [scenario_sharded_equals_single, scenario_half_dtypes, scenario_masked_and_reduced_param_grads,
             scenario_one_collective_per_call, scenario_gradcheck_sharded, scenario_subgroups,
             scenario_disagreeing_ranks_raise_everywhere, scenario_checks_before_the_layer_raise_everywhere,
             scenario_ddp_with_spatial_shards,
             scenario_subgroups_of_a_subset_group, scenario_subgroups_listed_differently]


def _worker(rank, port, out_dir, names):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the test, with the stacks
    # gloo's own timeout: a collective some rank never joins raises instead of hanging
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    results = []
    try:
        for fn in SCENARIOS:
            if fn.__name__ not in names:
                continue
            log = []
            try:
                fn(rank, log)
                results.append(f"PASS {fn.__name__}: " + "; ".join(log))
            except Exception:
                results.append(f"FAIL {fn.__name__}: {traceback.format_exc()}")
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(results))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    names = [fn.__name__ for fn in SCENARIOS]
    mp.start_processes(_worker, args=(_free_port(), str(out), names), nprocs=WORLD, join=True, start_method="spawn")
    return [(out / f"rank{r}.txt").read_text() for r in range(WORLD)]


@pytest.mark.parametrize("name", [fn.__name__ for fn in SCENARIOS])
def test_four_ranks_over_gloo(results, name):
    for r, text in enumerate(results):
        entries = [e for e in text.split("\n") if e.startswith(("PASS " + name + ":", "FAIL " + name + ":"))]
        assert entries, f"rank {r} did not run {name}"
        start = text.index(entries[0])
        if entries[0].startswith("FAIL"):
            end = text.find("\nPASS ", start + 1)
            pytest.fail(f"rank {r}: {text[start:end if end > 0 else None]}")
        if r == 0:
            print(f"\n{entries[0]}")
