"""distgn.torch.GroupNorm against torch.nn.GroupNorm in one process."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distgn.torch as dgn


def rel_err(a, b):
    """max |a - b| relative to the reference's scale (max |b|)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


class Model(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm1 = norm(4, 16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm2 = norm(8, 32, eps=1e-6)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.silu(self.norm1(self.conv1(x)))
        x = F.silu(self.norm2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_model_swaps_class_and_loads_state_dict(fmt):
    torch.manual_seed(0)
    ref = Model(nn.GroupNorm)
    with torch.no_grad():
        for m in (ref.norm1, ref.norm2):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    model = Model(dgn.GroupNorm)
    assert list(model.state_dict().keys()) == list(ref.state_dict().keys())
    model.load_state_dict(ref.state_dict())  # strict: same names and shapes
    ref, model = ref.to(memory_format=fmt), model.to(memory_format=fmt)
    x = torch.randn(4, 3, 12, 10).to(memory_format=fmt)
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_d = ref(xr), model(xd)
    out_r.square().sum().backward()
    out_d.square().sum().backward()
    errors = {"output": rel_err(out_d, out_r), "dx": rel_err(xd.grad, xr.grad)}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        errors["d" + name] = rel_err(p.grad, q.grad)
    print(f"\nparity float32 {fmt}: max error relative to scale: " +
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    for k, v in errors.items():
        assert v < 1e-5, (k, v)


def reference(x, g, weight, bias, eps):
    return F.group_norm(x.contiguous(), g, weight, bias, eps)


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 3), 4), ((3, 6, 7), 3), ((2, 4, 3, 2, 5), 2),
                                          ((1, 32, 8, 8), 32), ((5, 12), 4), ((3, 6, 1, 1), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_backward_match_torch(shape, groups, dtype, affine):
    torch.manual_seed(1)
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).requires_grad_()
    layer = dgn.GroupNorm(groups, shape[1], affine=affine, dtype=dtype)
    ref = nn.GroupNorm(groups, shape[1], affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        layer.load_state_dict(ref.state_dict())
    y, yr = layer(x), ref(x)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    params = [layer.weight, layer.bias] if affine else []
    params_r = [ref.weight, ref.bias] if affine else []
    g = torch.autograd.grad(y, [x, *params], dy)
    gr = torch.autograd.grad(yr, [x, *params_r], dy)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(y, yr) < tol
    for a, b in zip(g, gr):
        assert rel_err(a, b) < tol


def test_one_element_cells():
    """A cell of one position: x - mean is 0, so y is the bias and dx, dweight are 0,
    exactly (torch's own kernels leave rounding noise there)."""
    torch.manual_seed(9)
    x = torch.randn(2, 6, 1, 1, requires_grad=True)
    layer = dgn.GroupNorm(6, 6)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    y = layer(x)
    assert torch.equal(y, layer.bias.detach().view(1, 6, 1, 1).expand(2, 6, 1, 1))
    dx, dw, db = torch.autograd.grad(y, [x, layer.weight, layer.bias], torch.randn_like(y))
    assert not dx.any() and not dw.any()


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (2, 8, 5, 3)),
                                       (torch.channels_last_3d, (2, 8, 3, 4, 2))])
def test_channels_last_in_and_out(fmt, shape):
    torch.manual_seed(2)
    x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    assert not x.is_contiguous()
    layer = dgn.GroupNorm(4, 8)
    y = layer(x)
    assert y.is_contiguous(memory_format=fmt)
    dy = torch.randn_like(y)  # preserves the format
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.is_contiguous(memory_format=fmt)
    yr = F.group_norm(x.detach().contiguous(), 4, eps=1e-5)
    assert rel_err(y, yr) < 1e-5
    x2 = x.detach().contiguous().requires_grad_()
    (dx2,) = torch.autograd.grad(F.group_norm(x2, 4, eps=1e-5), x2, dy.contiguous())
    assert rel_err(dx, dx2) < 1e-5


def test_channels_last_runs_on_the_tensors_memory(monkeypatch):
    """No copy of x: the view handed to C++ points at x's own storage."""
    from distgn import _distgn
    seen = []
    real = _distgn.View

    def spy(data, shape, dtype, layout="nhwc", device="cpu"):
        seen.append((data, tuple(shape), layout))
        return real(data, shape, dtype, layout, device)

    monkeypatch.setattr(_distgn, "View", spy)
    for fmt, layout in [(torch.contiguous_format, "nchw"), (torch.channels_last, "nhwc")]:
        seen.clear()
        x = torch.randn(2, 8, 5, 3).to(memory_format=fmt)
        dgn.GroupNorm(4, 8, affine=False)(x)
        assert seen[0][0] == x.data_ptr() and seen[0][2] == layout
        assert seen[0][1] == ((2, 8, 5, 3) if layout == "nchw" else (2, 5, 3, 8))


def test_strided_view_is_made_contiguous():
    x = torch.randn(2, 8, 6, 10)[:, :, :, ::2]
    y = dgn.group_norm(x, 4)
    assert rel_err(y, F.group_norm(x.contiguous(), 4, eps=1e-5)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_half_dtypes(dtype, fmt):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 5).to(dtype).to(memory_format=fmt).requires_grad_()
    layer = dgn.GroupNorm(4, 8, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    y = layer(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64 = F.group_norm(x64, 4, w64, b64, 1e-5)
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    assert rel_err(y, y64) < 2 * ulp
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)
    g64 = torch.autograd.grad(y64, [x64, w64, b64], dy.double())
    for a, b in zip(g, g64):
        assert a.dtype == dtype
        assert rel_err(a, b) < 8 * ulp


def test_functional_form_and_group_size():
    torch.manual_seed(4)
    x = torch.randn(3, 12, 4, 4)
    w, b = torch.rand(12), torch.rand(12)
    ref = F.group_norm(x, 3, w, b, 1e-5)
    assert rel_err(dgn.group_norm(x, 3, w, b), ref) < 1e-5
    assert rel_err(dgn.group_norm(x, None, w, b, group_size=4), ref) < 1e-5
    layer = dgn.GroupNorm(None, 12, group_size=4)
    assert rel_err(layer(x), F.group_norm(x, 3, eps=1e-5)) < 1e-5


def test_exact_variance_and_large_mean():
    torch.manual_seed(5)
    x = torch.randn(2, 8, 16, 16) + 1e3
    ref = F.group_norm(x.double(), 4, eps=1e-5)
    for fast in (True, False):
        y = dgn.group_norm(x, 4, use_fast_variance=fast)
        assert rel_err(y, ref) < 1e-4


def test_mask_matches_the_valid_slice():
    """Statistics of the valid positions only: a mask keeping W < 3 gives,
    there, torch's output on x[..., :3]."""
    torch.manual_seed(6)
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    mask[..., :3] = True
    w, b = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.detach().to(memory_format=fmt).requires_grad_()
        y = dgn.group_norm(xf, 4, w, b, mask=mask)
        ref = F.group_norm(x.detach()[..., :3], 4, w, b, 1e-5)
        assert rel_err(y[..., :3], ref) < 1e-12
    # gradients of a loss that only reads the valid positions
    y = dgn.group_norm(x, 4, w, b, mask=mask)
    (dx,) = torch.autograd.grad(y[..., :3].sum(), x)
    xs = x.detach()[..., :3].clone().requires_grad_()
    (dxs,) = torch.autograd.grad(F.group_norm(xs, 4, w, b, 1e-5).sum(), xs)
    assert rel_err(dx[..., :3], dxs) < 1e-10


def test_gradcheck_float64():
    torch.manual_seed(7)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.rand(6, dtype=torch.float64, requires_grad=True)
    for fast in (True, False):
        assert torch.autograd.gradcheck(lambda x, w, b: dgn.group_norm(x, 3, w, b, use_fast_variance=fast),
                                        (x, w, b))
    xl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: dgn.group_norm(x, 3, w, b), (xl, w, b))
    mask = torch.rand(2, 1, 3, 4) > 0.3
    assert torch.autograd.gradcheck(lambda x, w, b: dgn.group_norm(x, 3, w, b, mask=mask), (x, w, b))


def test_backward_twice_through_one_layer():
    """Two forwards through one module, then one backward: each uses its own saved state."""
    torch.manual_seed(8)
    layer = dgn.GroupNorm(2, 4)
    ref = nn.GroupNorm(2, 4)
    a, b = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)
    ca, cb = torch.randn(a.shape), torch.randn(b.shape)
    ((layer(a) * ca).sum() + (layer(b) * cb).sum()).backward()
    ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ((ref(ar) * ca).sum() + (ref(br) * cb).sum()).backward()
    assert rel_err(a.grad, ar.grad) < 1e-5 and rel_err(b.grad, br.grad) < 1e-5
    assert rel_err(layer.weight.grad, ref.weight.grad) < 1e-5


def test_state_dict_round_trip_with_torch():
    ref = nn.GroupNorm(4, 8)
    with torch.no_grad():
        ref.weight.uniform_()
        ref.bias.uniform_()
    layer = dgn.GroupNorm(4, 8)
    layer.load_state_dict(ref.state_dict())
    back = nn.GroupNorm(4, 8)
    back.load_state_dict(layer.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)
    assert isinstance(layer.weight, nn.Parameter) and layer.eps == 1e-5 and layer.affine
    assert dgn.GroupNorm(4, 8, affine=False).state_dict() == {}


def test_parameters_changed_in_place_are_used():
    """The layer reads weight and bias again after an optimizer step or load_state_dict."""
    torch.manual_seed(10)
    layer, ref = dgn.GroupNorm(2, 4), nn.GroupNorm(2, 4)
    opt = torch.optim.SGD(list(layer.parameters()) + list(ref.parameters()), lr=0.5)
    x = torch.randn(3, 4, 5)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) * x).sum().backward()
        (ref(x) * x).sum().backward()
        opt.step()
        assert rel_err(layer(x), ref(x)) < 1e-5
    other = nn.GroupNorm(2, 4)
    with torch.no_grad():
        other.weight.uniform_()
    layer.load_state_dict(other.state_dict())
    assert rel_err(layer(x), other(x)) < 1e-5


def test_payloads_go_over_the_groups_cpu_backend():
    """torch 2's multi-backend groups ("cpu:gloo,cuda:nccl") carry the host payloads over their CPU backend."""
    assert dgn._host_backend("cpu:gloo,cuda:nccl") == "gloo"
    assert dgn._host_backend("gloo") == "gloo" and dgn._host_backend("nccl") == "nccl"
    assert dgn._host_backend(None) is None  # mpi4py
