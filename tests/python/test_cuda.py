"""distgn.torch on CUDA tensors: the CUDA backend on torch's current stream,
outputs from torch's caching allocator, the payloads of the collectives
staged through host memory (over NCCL: device copies of them). Skipped
without a GPU, or with a build of the package without the CUDA backend
(pip install . --config-settings=cmake.define.DISTGN_CUDA=ON builds it)."""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F

import distgn.torch as dgn
from distgn import _distgn

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _distgn.with_cuda),
                                reason="needs a CUDA GPU and a build of distgn with its CUDA backend")


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.float16, 4e-3),
                                       (torch.bfloat16, 3e-2)])
def test_parity_with_torch_on_the_gpu(fmt, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, 12, 10, generator=g) * 2 + 0.5).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    w, b = torch.rand(64, generator=g) + 0.5, torch.rand(64, generator=g)
    ours, ref = dgn.GroupNorm(32, 64).cuda(), torch.nn.GroupNorm(32, 64).cuda()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    xa = x.cuda().to(memory_format=fmt).requires_grad_()
    xb = x.cuda().float().to(memory_format=fmt).requires_grad_()
    ya, yb = ours(xa), ref(xb)
    ya.backward(dy.cuda().to(memory_format=fmt))
    yb.backward(dy.cuda().float().to(memory_format=fmt))
    assert ya.is_cuda and ya.dtype == dtype and ya.is_contiguous(memory_format=fmt)
    assert rel_err(ya, yb) < tol and rel_err(xa.grad, xb.grad) < tol
    assert ours.weight.grad.is_cuda and rel_err(ours.weight.grad, ref.weight.grad) < max(tol, 1e-5)
    assert rel_err(ours.bias.grad, ref.bias.grad) < max(tol, 1e-5)


def test_runs_on_the_current_stream():
    """On a side stream, with no synchronisation but the stream's own order."""
    x = torch.randn(8, 32, 64, 64, device="cuda")
    ref = F.group_norm(x, 8, eps=1e-5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = dgn.group_norm(x, 8)
        z = y * 1.0  # queued after distgn's kernels on the same stream
    side.synchronize()
    assert rel_err(z, ref) < 1e-5


def test_mask_on_the_gpu():
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    m = torch.rand(2, 1, 6, 5) > 0.3
    y_cpu = dgn.group_norm(x, 4, mask=m)
    y_gpu = dgn.group_norm(x.cuda(), 4, mask=m.cuda())
    keep = m.expand_as(x)
    assert rel_err(y_gpu.cpu()[keep], y_cpu[keep]) < 1e-12


def _worker(rank, world, port, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
    try:
        sizes = [3, 0, 5, 2][:world]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 8, sum(sizes), 4, generator=g, dtype=torch.float64)
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        F.group_norm(xr, 4, eps=1e-5).backward(dy)
        start = sum(sizes[:rank])
        sl = (slice(None), slice(None), slice(start, start + sizes[rank]))
        xs = x[sl].to(device).requires_grad_()
        ys = dgn.group_norm(xs, 4, process_group=dist.group.WORLD)
        ys.backward(dy[sl].to(device))
        ok = sizes[rank] == 0 or (rel_err(ys.cpu(), F.group_norm(x, 4, eps=1e-5)[sl]) < 1e-12
                                  and rel_err(xs.grad.cpu(), xr.grad[sl]) < 1e-12)
        text = "PASS" if ok else "FAIL values"
    except Exception:
        text = "FAIL " + traceback.format_exc()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(text)


def _run(world, backend, tmp_path):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, backend, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    for r in range(world):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert text == "PASS", f"rank {r}: {text}"


def test_sharded_cuda_tensors_over_gloo(tmp_path):
    """CUDA shards over gloo (the payloads are host memory): ranks may share one GPU."""
    _run(4, "gloo", tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_sharded_cuda_tensors_over_nccl(tmp_path):
    _run(min(4, torch.cuda.device_count()), "nccl", tmp_path)
