"""distgn for PyTorch: a drop-in torch.nn.GroupNorm with distgn's semantics.

``GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, ...)`` has
torch.nn.GroupNorm's signature, parameters (``weight``, ``bias``) and
state_dict, and Flax's fields as keywords. With ``process_group`` the
statistics of a cell are those of the union of the group's shards
(docs/semantics.md §7), merged by one torch.distributed collective per
forward (an all_gather of every rank's partial moments) and one per backward
(an all_reduce of the partial sums).

Tensors are handed to the C++ layer by their data pointers: a contiguous
(N, C, ...) tensor runs as distgn's channels-first layout, a tensor in
torch.channels_last / channels_last_3d memory format as channels-last on its
physical (N, ..., C) order, and outputs keep that memory format. Any other
tensor (a strided view) is made contiguous once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from . import _distgn

__all__ = ["GroupNorm", "group_norm"]

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"distgn supports float32, float64, float16 and bfloat16 tensors, not {dtype}") from None


def _layout_of(x: torch.Tensor):
    """(tensor with distgn-usable memory, layout, physical shape, memory format)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    # channels last: the format's strides (the channel stride 1), also where
    # the tensor is contiguous too (empty, or one spatial position).
    if fmt is not None and x.is_contiguous(memory_format=fmt) and (
            not x.is_contiguous() or (x.shape[1] > 1 and x.stride(1) == 1)):
        return x, "nhwc", (x.shape[0], *x.shape[2:], x.shape[1]), fmt
    x = x.contiguous()
    return x, "nchw", tuple(x.shape), torch.contiguous_format


def _as_layout(t: torch.Tensor, fmt) -> torch.Tensor:
    return t.contiguous(memory_format=fmt)


def _device_name(t: torch.Tensor) -> str:
    """distgn's name of t's device ("cpu", "cuda"); ValueError where this build cannot run it."""
    if t.is_cpu:  # (a flag: t.device would make an object at every view)
        return "cpu"
    if t.is_cuda:
        if not _distgn.with_cuda:
            raise ValueError("this build of distgn has no CUDA backend, so it cannot run CUDA tensors; build it with "
                             "pip install . --config-settings=cmake.define.DISTGN_CUDA=ON (nvcc needed)")
        return "cuda"
    raise ValueError(f"distgn.torch runs on CPU and CUDA tensors, not {t.device}")


def _view(t: torch.Tensor, layout: str, shape) -> "_distgn.View":
    return _distgn.View(t.data_ptr(), list(shape), _dtype_name(t.dtype), layout, _device_name(t))


def _on_device(t: torch.Tensor):
    """The context of a call on t: its CUDA device current, or nothing for the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def _use_current_stream(layer, t: torch.Tensor):
    """A call on CUDA tensors runs on torch's current stream of their device."""
    if t.is_cuda:
        layer.set_stream(torch.cuda.current_stream(t.device).cuda_stream)


def _mask_view(mask, x: torch.Tensor, layout: str):
    """The mask as distgn's MaskView (one byte per element, in x's physical
    axis order, the channel axis expanded to C); returns (owner, view)."""
    if mask is None:
        return None, None
    m = torch.as_tensor(mask, device=x.device)
    if m.dim() > x.dim():
        raise ValueError(f"mask of shape {tuple(m.shape)} does not broadcast to x of shape {tuple(x.shape)}")
    m = m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape))
    if x.dim() >= 2 and m.shape[1] == 1 and x.shape[1] != 1:
        m = m.expand(m.shape[0], x.shape[1], *m.shape[2:])
    if layout == "nhwc":
        m = m.permute(0, *range(2, x.dim()), 1)
    m = (m != 0).contiguous().view(torch.uint8)
    return m, _distgn.MaskView(m.data_ptr(), list(m.shape), _device_name(m))


class _Config:
    """One layer's fields; the C++ layers it makes, one per (x, weight) dtypes."""

    def __init__(self, num_groups, group_size, eps, use_fast_variance, force_float32_reductions,
                 process_group, axis_index_groups, reduce_param_grads):
        self.num_groups = num_groups
        self.group_size = group_size
        self.eps = float(eps)
        self.use_fast_variance = bool(use_fast_variance)
        self.force_float32_reductions = bool(force_float32_reductions)
        self.process_group = process_group
        self.axis_index_groups = axis_index_groups
        self.reduce_param_grads = bool(reduce_param_grads)
        self._layers = {}
        self._subgroup = _UNSET
        self._exchange = None
        self._plans = {}
        self._loaded = {}

    def exchange(self):
        if self._exchange is None:
            self._exchange = _Exchange()
        return self._exchange

    def layer(self, x_dtype: str, w_dtype, has_weight: bool, has_bias: bool):
        key = (x_dtype, w_dtype, has_weight, has_bias)
        layer = self._layers.get(key)
        if layer is None:
            # dtype = x's dtype: torch's output dtype (the statistics are at
            # least float32 unless force_float32_reductions is off).
            layer = _distgn.Layer(self.num_groups, self.group_size, self.eps, x_dtype, w_dtype or "f32",
                                  has_weight, has_bias, self.use_fast_variance, self.force_float32_reductions)
            self._layers[key] = layer
        return layer

    def plan(self, layer, shape, layout, dtype):
        """layer.plan, resolved once per input shape (it validates: semantics §2)."""
        key = (id(layer), tuple(shape), layout, dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = layer.plan(list(shape), layout, dtype)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def load_parameters(self, layer, w, b):
        """The layer's weight and bias from these tensors, copied (C values)
        only when they are other memory or have changed since (the cache
        holds the tensors, so their memory cannot be reused meanwhile)."""
        key = tuple((t.data_ptr(), t._version, t.numel(), t.dtype) if t is not None else None for t in (w, b))
        cached = self._loaded.get(id(layer))
        if cached is not None and cached[0] == key:
            return
        # the layer copies them from host memory (and onto the device itself)
        if w is not None:
            layer.set_scale(_param(w.cpu()))
        if b is not None:
            layer.set_bias(_param(b.cpu()))
        self._loaded[id(layer)] = (key, (w, b))

    def group(self):
        """The _Comm of the ranks this rank shares statistics with, or None (a local layer)."""
        pg = self.process_group
        if pg is None:
            return None
        if self._subgroup is _UNSET:  # made once (None: a subgroup of this rank alone)
            self._subgroup = _comm(pg, self.axis_index_groups)
        return self._subgroup


class _Comm:
    """The ranks that share statistics: a torch.distributed process group (or
    an mpi4py communicator), its size and backend (None for mpi4py)."""

    __slots__ = ("handle", "size", "backend")

    def __init__(self, handle, size, backend):
        self.handle, self.size, self.backend = handle, size, backend


_UNSET = object()
_SUBGROUPS = {}  # (process group, this rank's subgroup's global ranks) -> _Comm: one communicator each


def _comm(pg, axis_index_groups):
    """semantics §7: the ranks of pg this rank shares statistics with."""
    mpi = _is_mpi(pg)
    if not mpi:
        if not dist.is_initialized():
            raise ValueError("process_group given but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        if dist.get_rank(pg) < 0:
            raise ValueError(f"this rank (global rank {dist.get_rank()}) is not a member of the layer's process_group")
    size = pg.Get_size() if mpi else dist.get_world_size(pg)
    backend = None if mpi else str(dist.get_backend(pg))
    if axis_index_groups is None:
        return _Comm(pg, size, _host_backend(backend))
    groups = [list(map(int, g)) for g in axis_index_groups]
    flat = sorted(r for g in groups for r in g)
    if flat != list(range(size)):
        raise ValueError("axis_index_groups must cover all indices exactly once")
    me = pg.Get_rank() if mpi else dist.get_rank(pg)
    mine = next(g for g in groups if me in g)
    if mpi:  # one Split of the communicator (collective over pg's ranks), in the groups' order
        key = (pg, tuple(tuple(g) for g in groups))
        if key not in _SUBGROUPS:
            sub = pg.Split(groups.index(mine), mine.index(me))
            _SUBGROUPS[key] = _Comm(sub, len(mine), None) if len(mine) > 1 else None
        return _SUBGROUPS[key]
    if len(mine) == 1:
        return None  # statistics of this rank's shard alone: a local layer
    global_ranks = tuple(sorted(_global_ranks(pg)[r] for r in mine))  # new_group sorts them too
    key = (pg, global_ranks)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = _Comm(_member_group(pg, global_ranks, backend), len(mine), _host_backend(backend))
    return _SUBGROUPS[key]


def _host_backend(backend):
    """The backend that carries host tensors: a group of several backends
    (torch 2's "cpu:gloo,cuda:nccl") sends the payloads, which are host
    memory, over its CPU one."""
    if backend is None or ":" not in backend:
        return backend
    parts = dict(item.split(":", 1) for item in backend.split(","))
    return parts.get("cpu", backend)


def _global_ranks(pg):
    """pg's global ranks, in group-rank order."""
    if hasattr(dist, "get_process_group_ranks"):
        return list(dist.get_process_group_ranks(pg))
    if pg is None or pg is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    mapping = dist.distributed_c10d._pg_group_ranks[pg]  # torch 1.13
    return [g for g, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def _member_group(pg, global_ranks, backend):
    """A process group over `global_ranks` whose creation only they take part
    in (torch.distributed.new_group is collective over the whole default
    group: made lazily on the members alone, it would wait for every other
    rank). torch >= 2.1: new_group(use_local_synchronization=True). torch
    1.13: the backend's process group over a prefix of the default store, named
    by the parent group and the members, so that the members, and only they,
    meet there."""
    import inspect

    if "use_local_synchronization" in inspect.signature(dist.new_group).parameters:
        return dist.new_group(list(global_ranks), backend=backend, use_local_synchronization=True)
    c10d = dist.distributed_c10d
    store = c10d._get_default_store()
    timeout = getattr(store, "timeout", None) or c10d.default_pg_timeout
    parent = c10d._pg_names.get(pg if pg is not None else dist.group.WORLD, "world")
    prefix = f"distgn_subgroup/{parent}/{'_'.join(map(str, global_ranks))}"
    rank = global_ranks.index(dist.get_rank())
    if backend == "gloo":
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, len(global_ranks), timeout=timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, len(global_ranks), opts)
    raise ValueError(f"axis_index_groups over a {backend} process group needs torch >= 2.1 "
                     f"(new_group(use_local_synchronization=True)); torch {torch.__version__} has gloo and nccl")


def _collective(name, *args, **kwargs):
    """torch.distributed's collective `name` (looked up at each call)."""
    return getattr(dist, name)(*args, **kwargs)


def _signature(cfg, plan, x) -> str:
    """What the ranks of a group must agree on: all but the reduced extents,
    in x's logical (N, C, ...) order (a rank's memory format and mask are its own)."""
    dims = ", ".join(str(d) if i < 2 else "*" for i, d in enumerate(x.shape))
    return (f"x ({dims}), groups {plan.num_groups}, output {plan.output_dtype}, stats {plan.stats_dtype}, "
            f"epsilon {cfg.eps}, fast variance {cfg.use_fast_variance}, force f32 {cfg.force_float32_reductions}")


class _Exchange:
    """The forward merge over a process group: in the steady state one
    all_gather of [flag, count/mean/M2 per cell] per rank; when a rank's input
    is new, invalid or different, an agreement (an all_gather of a fixed-size
    record per rank: its error or its signature) first, in which all ranks
    raise the same error or agree, then the gather again."""

    RECORD = 1024

    def __init__(self):
        self.signature = None
        self.cells = 0

    def _gather(self, comm, mine, valid):
        per_rank = 1 + 3 * self.cells
        send = torch.zeros(per_rank, dtype=torch.float64)
        if valid:
            send[1:] = mine
        else:
            send[0] = 1
        out = torch.empty(comm.size * per_rank, dtype=torch.float64)
        _all_gather(comm, out, send)
        out = out.view(comm.size, per_rank)
        return out[:, 1:].contiguous().view(-1), bool((out[:, 0] == 0).all())

    def _agree(self, comm, error, signature, cells):
        ranks = comm.size
        text = (error or signature).encode()[: self.RECORD - 17]
        rec = torch.zeros(self.RECORD, dtype=torch.uint8)
        rec[0] = 0 if error else 1
        rec[8:16] = torch.tensor([cells], dtype=torch.int64).view(torch.uint8)
        rec[16:16 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        out = torch.empty(ranks * self.RECORD, dtype=torch.uint8)
        _all_gather(comm, out, rec)
        records = []
        for r in range(ranks):
            b = out[r * self.RECORD:(r + 1) * self.RECORD]
            raw = bytes(b[16:].tolist()).split(b"\0", 1)[0].decode(errors="replace")
            records.append((bool(b[0].item()), int(b[8:16].clone().view(torch.int64).item()), raw))
        if error:
            raise ValueError(error)
        for r, (valid, _, text) in enumerate(records):
            if not valid:
                raise ValueError(f"rank {r} of this rank's group rejected its input: {text}")
        for r in range(1, ranks):
            if records[r][1:] != records[0][1:]:
                raise ValueError("the ranks of a group disagree on what must be shared (only reduced axes may "
                                 f"differ): rank 0 has {records[0][2]}; rank {r} has {records[r][2]}")
        self.signature, self.cells = signature, cells

    def merge(self, comm, error, signature, mine):
        """The gathered count/mean/M2 of every rank, concatenated in rank order."""
        unchanged = self.signature is not None and not error and signature == self.signature
        if self.signature is not None:
            gathered, ok = self._gather(comm, mine, unchanged)
            if ok:
                return gathered
        self._agree(comm, error, signature, 0 if mine is None else mine.numel() // 3)
        return self._gather(comm, mine, True)[0]


def _is_mpi(pg) -> bool:
    """An mpi4py communicator (or anything with its Allgather / Allreduce)."""
    return hasattr(pg, "Allgather") and hasattr(pg, "Allreduce")


def _staged(comm, *tensors):
    """NCCL takes device tensors: the host payloads' copies on the current
    CUDA device (the tensors themselves for any other backend)."""
    if comm.backend != "nccl":
        return tensors
    device = torch.device("cuda", torch.cuda.current_device())
    return tuple(t.to(device) for t in tensors)


def _all_reduce(comm, payload):
    """One all_reduce (sum) of the host tensor `payload` over comm, in place."""
    if comm.backend is None:
        from mpi4py import MPI
        comm.handle.Allreduce(MPI.IN_PLACE, payload.numpy())
        return
    (staged,) = _staged(comm, payload)
    _collective("all_reduce", staged, group=comm.handle)
    if staged is not payload:
        payload.copy_(staged)


def _all_gather(comm, out, send):
    """One all_gather of the host tensor `send` from every rank into `out`, in rank order."""
    if comm.backend is None:
        comm.handle.Allgather(send.numpy(), out.numpy())
    elif comm.backend == "gloo":  # gloo has no all_gather_into_tensor (torch 1.13)
        _collective("all_gather", list(out.view(comm.size, -1).unbind(0)), send, group=comm.handle)
    else:
        staged_out, staged_send = _staged(comm, out, send)
        _collective("all_gather_into_tensor", staged_out, staged_send, group=comm.handle)
        if staged_out is not out:
            out.copy_(staged_out)


def _param(t):
    return _distgn.View(t.data_ptr(), [t.numel()], _dtype_name(t.dtype), "nhwc", _device_name(t))


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, cfg: _Config, num_channels):
        with _on_device(x):
            return _GroupNormFunction._forward(ctx, x, weight, bias, mask, cfg, num_channels)

    @staticmethod
    def _forward(ctx, x, weight, bias, mask, cfg: _Config, num_channels):
        comm = cfg.group()
        # With a process group, a rank whose call is invalid (its channels,
        # dtype, mask or shape) still takes part in the collective, flagging
        # it, so that every rank of the group raises.
        error, signature, mine = "", "", None
        try:
            _check_channels(x, num_channels)
            xc, layout, shape, fmt = _layout_of(x.detach())
            w = weight.detach().contiguous() if weight is not None else None
            b = bias.detach().contiguous() if bias is not None else None
            if w is not None and b is not None and w.dtype != b.dtype:
                b = b.to(w.dtype)
            pdtype = _dtype_name(w.dtype) if w is not None else (_dtype_name(b.dtype) if b is not None else None)
            layer = cfg.layer(_dtype_name(xc.dtype), pdtype, w is not None, b is not None)
            cfg.load_parameters(layer, w, b)
            _use_current_stream(layer, xc)
            mask_owner, mview = _mask_view(mask, xc, layout)
            xv = _view(xc, layout, shape)
            plan = cfg.plan(layer, shape, layout, _dtype_name(xc.dtype))
            if comm is not None:
                signature = _signature(cfg, plan, x)
                mine = torch.empty(3 * plan.num_cells, dtype=torch.float64)
                layer.forward_partial_stats(xv, mview, mine.data_ptr(), mine.numel())
        except ValueError as e:
            if comm is None:
                raise
            error = str(e)
        state = _distgn.ForwardState()
        if comm is None:
            y = torch.empty(x.shape, dtype=_TORCH_DTYPES[plan.output_dtype], device=x.device, memory_format=fmt)
            layer.forward(xv, _view(y, layout, shape), mview, state)
        else:
            gathered = cfg.exchange().merge(comm, error, signature, mine)  # raises on every rank if one failed
            y = torch.empty(x.shape, dtype=_TORCH_DTYPES[plan.output_dtype], device=x.device, memory_format=fmt)
            layer.forward_finish(xv, _view(y, layout, shape), mview, gathered.data_ptr(), comm.size, state)
        ctx.cfg, ctx.layer, ctx.state = cfg, layer, state
        ctx.layout, ctx.shape, ctx.fmt, ctx.mask_owner = layout, shape, fmt, mask_owner
        ctx.has_weight, ctx.has_bias = w is not None, b is not None
        ctx.save_for_backward(xc, w, b)
        return y

    @staticmethod
    @once_differentiable  # distgn's backward is not itself differentiable
    def backward(ctx, dy):
        with _on_device(dy):
            return _GroupNormFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        xc, w, b = ctx.saved_tensors
        layer, state, layout, shape = ctx.layer, ctx.state, ctx.layout, ctx.shape
        # The layer may have run another call since: its parameters are this call's again.
        ctx.cfg.load_parameters(layer, w, b)
        _use_current_stream(layer, xc)
        dy = _as_layout(dy, ctx.fmt)
        if dy.dtype not in _DTYPES:
            dy = dy.to(xc.dtype)
        mask_owner = ctx.mask_owner
        mview = None if mask_owner is None else _distgn.MaskView(mask_owner.data_ptr(), list(mask_owner.shape),
                                                                  _device_name(mask_owner))
        xv, dyv = _view(xc, layout, shape), _view(dy, layout, shape)
        dx = torch.empty(xc.shape, dtype=xc.dtype, device=xc.device, memory_format=ctx.fmt)
        dxv = _view(dx, layout, shape)
        pdtype = w.dtype if w is not None else (b.dtype if b is not None else torch.float32)
        channels = state.plan.channels
        # dweight/dbias where x is (the layer writes them on the device for CUDA x)
        where = {"device": xc.device} if xc.is_cuda else {}
        dw = torch.empty(channels, dtype=pdtype, **where) if ctx.has_weight else None
        db = torch.empty(channels, dtype=pdtype, **where) if ctx.has_bias else None
        dwv = _param(dw) if dw is not None else None
        dbv = _param(db) if db is not None else None
        comm = ctx.cfg.group()
        if comm is None:
            layer.backward(xv, dyv, mview, state, dxv, dwv, dbv)
        else:
            cells = state.plan.num_cells
            n = 2 * cells + 2 * channels
            # [flag, A and B per cell, dbias and dscale per channel]: one
            # all_reduce; a rank that cannot make its sums flags it, and
            # every rank raises.
            payload = torch.zeros(1 + n, dtype=torch.float64)
            error = ""
            try:
                layer.backward_partial_sums(xv, dyv, mview, state, payload[1:].data_ptr(), n)
            except ValueError as e:
                error = str(e)
                payload.zero_()
                payload[0] = 1
            own = None if ctx.cfg.reduce_param_grads else payload[1 + 2 * cells:].clone()
            _all_reduce(comm, payload)
            if error:
                raise ValueError(error)
            if payload[0].item() != 0:
                raise ValueError(f"{int(payload[0].item())} rank(s) of this rank's group rejected their backward input")
            sums = payload[1:].clone()
            if own is not None:  # the per-channel sums stay this rank's (DDP reduces them)
                sums[2 * cells:] = own
            layer.backward_finish(xv, dyv, mview, state, sums.data_ptr(), dxv, dwv, dbv)
        return dx, dw, db, None, None, None


def _check_channels(x, num_channels):
    if x.dim() < 2:
        raise ValueError(f"Expected at least 2 dimensions for input tensor but received {x.dim()}")
    if num_channels is not None and x.shape[1] != num_channels:
        raise ValueError(f"Expected {num_channels} channels in the input, got input of shape {tuple(x.shape)}")


def group_norm(x, num_groups=32, weight=None, bias=None, eps=1e-5, *, group_size=None, use_fast_variance=True,
               force_float32_reductions=True, process_group=None, axis_index_groups=None, mask=None,
               reduce_param_grads=False):
    """Functional form of GroupNorm (torch.nn.functional.group_norm's arguments first)."""
    cfg = _Config(num_groups, group_size, eps, use_fast_variance, force_float32_reductions, process_group,
                  axis_index_groups, reduce_param_grads)
    return _GroupNormFunction.apply(x, weight, bias, mask, cfg, None)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm's drop-in: same arguments, parameters and state_dict.

    Keywords beyond torch's: ``group_size`` (pass ``num_groups=None`` to use
    it), ``use_fast_variance``, ``force_float32_reductions`` (Flax's fields),
    ``process_group`` (a torch.distributed group whose ranks share statistics;
    default none: a local layer; an mpi4py communicator instead, for ranks
    under mpirun without torch.distributed), ``axis_index_groups`` (semantics §7
    subgroups of that group's ranks) and ``reduce_param_grads`` (weight/bias
    gradients summed over the group instead of each rank's partial sums).

    Every rank of ``process_group`` must call the layer (ranks outside it
    need not, and raise ValueError if they do). With ``axis_index_groups``,
    each rank's subgroup is made at its first call by that subgroup's members
    alone (not torch.distributed.new_group's collective over every rank), once
    per process for every layer over the same ranks.
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, group_size=None,
                 use_fast_variance=True, force_float32_reductions=True, process_group=None,
                 axis_index_groups=None, reduce_param_grads=False, device=None, dtype=None):
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.group_size = group_size
        self.use_fast_variance = use_fast_variance
        self.force_float32_reductions = force_float32_reductions
        self.process_group = process_group
        self.axis_index_groups = axis_index_groups
        self.reduce_param_grads = reduce_param_grads
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            self.bias = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # The configuration is checked here (semantics §2 on C alone), as torch does.
        _distgn.Layer(num_groups, group_size, eps, None, "f32", affine, affine, use_fast_variance,
                      force_float32_reductions).plan([1, num_channels], "nchw", "f32")
        self._cfg = _Config(num_groups, group_size, eps, use_fast_variance, force_float32_reductions,
                            process_group, axis_index_groups, reduce_param_grads)
        self.reset_parameters()

    def reset_parameters(self):
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x, mask=None):
        return _GroupNormFunction.apply(x, self.weight, self.bias, mask, self._cfg, self.num_channels)

    def extra_repr(self):
        s = "{num_groups}, {num_channels}, eps={eps}, affine={affine}".format(**self.__dict__)
        if self.group_size is not None:
            s += f", group_size={self.group_size}"
        if self.process_group is not None:
            s += ", process_group=..."
        return s
