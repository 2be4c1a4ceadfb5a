"""Run by test_mpi4py.py under mpirun -np 4: distgn.torch with an mpi4py
communicator as the process group. Prints one PASS line per rank, or raises."""
import torch
from mpi4py import MPI

import distgn.torch as dgn


class Counting:
    """An mpi4py communicator that counts its collectives."""

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def Get_size(self):
        return self.comm.Get_size()

    def Get_rank(self):
        return self.comm.Get_rank()

    def Allgather(self, *a):
        self.calls.append("Allgather")
        return self.comm.Allgather(*a)

    def Allreduce(self, *a):
        self.calls.append("Allreduce")
        return self.comm.Allreduce(*a)

    def Split(self, *a):
        return Counting(self.comm.Split(*a))


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def main():
    comm = Counting(MPI.COMM_WORLD)
    rank, world = comm.Get_rank(), comm.Get_size()
    sizes = [3, 0, 2, 4][:world]
    g = torch.Generator().manual_seed(40)
    x = torch.randn(2, 8, sum(sizes), 3, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    start = sum(sizes[:rank])
    sl = (slice(None), slice(None), slice(start, start + sizes[rank]))
    layer = dgn.GroupNorm(4, 8, process_group=comm, dtype=torch.float64)
    ref = dgn.GroupNorm(4, 8, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    for step in range(3):
        comm.calls.clear()
        xs = x[sl].clone().requires_grad_()
        y = layer(xs)
        fwd = list(comm.calls)
        comm.calls.clear()
        y.backward(dy[sl])
        bwd = list(comm.calls)
        if step > 0:
            assert fwd == ["Allgather"] and bwd == ["Allreduce"], (fwd, bwd)
        if sizes[rank]:
            assert rel_err(y, ref(x)[sl]) < 1e-12 and rel_err(xs.grad, xr.grad[sl]) < 1e-12
    total = layer.weight.grad.clone() / 3
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, total.numpy())
    assert rel_err(total, ref.weight.grad) < 1e-12
    # subgroups {0, 2} and {1, 3}: each pair's shards of its own tensor
    team = rank % 2
    g = torch.Generator().manual_seed(41 + team)
    x = torch.randn(2, 8, 6, 3, generator=g, dtype=torch.float64)
    half = rank // 2
    sub = dgn.GroupNorm(4, 8, process_group=comm, axis_index_groups=[[0, 2], [1, 3]], dtype=torch.float64)
    y = sub(x[:, :, 3 * half:3 * half + 3])
    assert rel_err(y, torch.nn.functional.group_norm(x, 4, eps=1e-5)[:, :, 3 * half:3 * half + 3]) < 1e-12
    # a disagreeing rank: every rank raises
    try:
        layer(torch.randn(3 if rank == 1 else 2, 8, 2, 3, dtype=torch.float64))
        raise AssertionError("no error")
    except ValueError as e:
        assert "disagree" in str(e), str(e)
    print(f"PASS rank {rank}: mpi4py sharded == single process, 1 Allgather per forward, 1 Allreduce per "
          "backward, subgroups, disagreement raises", flush=True)


if __name__ == "__main__":
    main()
