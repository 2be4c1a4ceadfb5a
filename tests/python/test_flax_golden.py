"""distgn.torch on the Flax golden files (tests/data/flax, flax 0.12.8): the
cases torch's conventions can express (default reduction axes; the output
dtype that of x, as torch's). Flax's channels-last x is handed over as a
torch.channels_last view of the same memory (x.permute(0, 3, 1, 2))."""
import json
import pathlib

import numpy as np
import pytest
import torch

import distgn.torch as dgn

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "flax"
DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16}


def cases():
    manifest = json.loads((DATA / "manifest.json").read_text())
    for c in manifest["cases"]:
        params = c["use_scale"] or c["use_bias"]
        if (c["reduction_axes"] is None and c["input_dtype"] in DTYPES and c["output_dtype"] == c["input_dtype"]
                and c["dtype"] in (None, c["input_dtype"]) and len(c["shape"]) in (2, 3, 4, 5)
                and (not params or c["param_dtype"] == c["input_dtype"])
                and (c["layout"] == "nchw" or len(c["shape"]) in (4, 5))):
            yield pytest.param(c, id=c["name"])


def load(c, key):
    return torch.from_numpy(np.load(DATA / c["files"][key]))


def to_torch_order(t, c):
    """Flax's (N, ..., C) as a (N, C, ...) view of the same memory."""
    if c["layout"] == "nchw":
        return t
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def tolerance(dtype, magnitude, ulps):
    """semantics §8, as the C++ golden tests hold it: float32/64 within 1e-4
    (relative beyond unit scale); half within `ulps` units in the last place plus 1e-3 relative."""
    if dtype == torch.float16:
        ulp = torch.ldexp(torch.ones_like(magnitude), (torch.frexp(magnitude)[1] - 1).clamp_min(-14) - 10)
        return ulps * ulp + 1e-3 * magnitude
    return 1e-4 * magnitude.clamp_min(1.0)


def compare(got, want, dtype, floor, ulps):
    """(mismatches, worst error): NaN only where NaN is wanted, the rest within tolerance."""
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    both = ~(nan_got | nan_want)
    err = (got - want).abs()[both]
    bad = (err > tolerance(dtype, want.abs()[both].clamp_min(floor), ulps)).sum().item()
    return bad + (nan_got != nan_want).sum().item(), (err.max().item() if err.numel() else 0.0)


def run(c, dtype, x, weight, bias, mask, dy):
    x = x.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_() if weight is not None else None
    bias = bias.to(dtype).requires_grad_() if bias is not None else None
    y = dgn.group_norm(x, c["num_groups"], weight, bias, c["epsilon"], group_size=c["group_size"],
                       use_fast_variance=c["use_fast_variance"],
                       force_float32_reductions=c["force_float32_reductions"], mask=mask)
    out = {"y": y}
    if dy is not None:
        inputs = [t for t in (x, weight, bias) if t is not None]
        grads = list(torch.autograd.grad(y, inputs, dy.to(dtype)))
        out["dx"] = grads.pop(0)
        if weight is not None:
            out["dscale"] = grads.pop(0)
        if bias is not None:
            out["dbias"] = grads.pop(0)
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("c", list(cases()))
def test_flax_golden(c):
    dtype = DTYPES[c["input_dtype"]]
    x = to_torch_order(load(c, "x"), c)
    if c["layout"] == "nhwc":
        assert not x.to(dtype).is_contiguous()  # channels_last / channels_last_3d strides
    weight = load(c, "scale") if c["use_scale"] else None
    bias = load(c, "bias") if c["use_bias"] else None
    mask = None
    if "mask" in c["files"]:
        m = load(c, "mask") != 0
        mask = to_torch_order(m.reshape((1,) * (len(c["shape"]) - m.dim()) + tuple(m.shape)), c)
    dy = to_torch_order(load(c, "dy"), c) if "dy" in c["files"] else None
    mine = run(c, dtype, x, weight, bias, mask, dy)
    assert mine["y"].dtype == dtype and mine["y"].shape == x.shape
    # Flax's dx is NaN at masked NaN inputs, where semantics §9 gives rstd * dy * scale: skipped
    skip_dx = (~mask.expand(x.shape)) & ~torch.isfinite(x) if mask is not None else None
    truth = None
    for key, got in mine.items():
        if key not in c["files"]:
            continue
        want = load(c, key)
        want = (to_torch_order(want, c) if key in ("y", "dx") else want).double()
        got = got.double()
        if key == "dx" and skip_dx is not None:
            got, want = got.masked_fill(skip_dx, 0), want.masked_fill(skip_dx, 0)
        finite = want[torch.isfinite(want)]
        half_stats = dtype == torch.float16 and not c["force_float32_reductions"]
        floor = (1.0 if half_stats else 0.0) if key == "y" else max(1.0, finite.abs().max().item()
                                                                    if finite.numel() else 1.0)
        ulps = 4.0 if half_stats or (key == "dx" and dtype == torch.float16) else 1.0
        bad, worst = compare(got, want, dtype, floor, ulps)
        if bad == 0:
            continue
        # Flax itself off (large_mean_*, single_valid_cell): distgn within
        # tolerance of the float64 evaluation and never further from it than Flax
        if truth is None:
            truth = run(c, torch.float64, x, weight, bias, mask, dy)
        exact = truth[key]
        if key == "dx" and skip_dx is not None:
            exact = exact.masked_fill(skip_dx, 0)
        ours, flax = compare(got, exact, dtype, floor, ulps), compare(want, exact, dtype, floor, ulps)
        assert ours[0] == 0 and ours[1] <= flax[1], (key, "vs Flax", bad, worst, "vs float64", ours, flax)
