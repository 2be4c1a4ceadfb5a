#!/usr/bin/env python3
"""Regenerate the Flax golden files under tests/data/flax/ and tests/data/flax_pmap/.

Run with the system python3: it creates .venv-golden/ in the repository root,
installs the pinned jax/flax/numpy there, and re-executes itself inside it.
Fixed seeds: rerunning produces identical files.  See the manifests for the
case fields; bfloat16 arrays are stored as float32 (exact), float16 as '<f2'.
"""
import json, os, shutil, subprocess, sys, zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-golden"
PINS = ["jax[cpu]==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "numpy==2.4.6", "ml_dtypes==0.6.0"]
OUT = REPO / "tests" / "data" / "flax"
OUT_PMAP = REPO / "tests" / "data" / "flax_pmap"


def bootstrap():
    """Create the venv, install the pins, re-exec inside it (no-op when already there)."""
    if os.environ.get("DISTGN_GOLDEN_VENV") == "1":
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        for base in (sys.executable, "/root/.pyenv/versions/3.11.7/bin/python3"):
            if subprocess.call([base, "-m", "venv", str(VENV)]) == 0:
                break
        else:
            sys.exit("cannot create a virtual environment (python3 -m venv)")
    check = "import flax,jax,numpy;assert (flax.__version__,jax.__version__,numpy.__version__)==('0.12.8','0.10.2','2.4.6')"
    if subprocess.call([str(py), "-c", check], stderr=subprocess.DEVNULL) != 0:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PINS])
    env = dict(os.environ, DISTGN_GOLDEN_VENV="1")
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env)


bootstrap()
# 8 host devices for the pmap cases; must be set before jax is imported.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax  # noqa: E402
import flax.linen as nn  # noqa: E402

DT = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16, "f64": jnp.float64}
DT_NAME = {np.dtype(v): k for k, v in DT.items()}
NG = object()  # "leave num_groups at Flax's default (32)"

# ---------------------------------------------------------------------------
# single-process cases: name, NHWC shape, GroupNorm kwargs, options.
# options: in (input dtype), pd (param dtype), data ('normal'|'large_mean'|'small_std'),
#          mask ('random'|'nan'|'bcast:<shape>'|'all_masked'|'single_valid'), nchw (bool)
# ---------------------------------------------------------------------------
A = dict(use_scale=True, use_bias=True)          # affine
NA = dict(use_scale=False, use_bias=False)       # no params
CASES = [
    ("flax_test_g2", (2, 5, 4, 4, 32), dict(num_groups=2, epsilon=1e-5, **NA), {}),
    ("flax_test_g2_red0134", (2, 5, 4, 4, 32), dict(num_groups=2, epsilon=1e-5, reduction_axes=(0, 1, 3, 4), **NA), {}),
    ("flax_batched_3d", (3, 4, 32), dict(num_groups=2, epsilon=1e-5, reduction_axes=(-3, -2, -1), **NA), {}),
    ("flax_batched_stacked", (5, 3, 4, 32), dict(num_groups=2, epsilon=1e-5, reduction_axes=(-3, -2, -1), **NA), {}),
    ("mask_nan", (13, 3, 5, 77), dict(num_groups=7, epsilon=1e-5, **A), dict(mask="nan")),
    ("mask_finite", (4, 3, 5, 21), dict(num_groups=7, epsilon=1e-5, **A), dict(mask="random")),
    ("layernorm_g1", (3, 4, 4, 12), dict(num_groups=1, **A), {}),
    ("instancenorm_gs1", (3, 4, 4, 12), dict(num_groups=None, group_size=1, epsilon=1e-3, **A), {}),
    ("group_size4", (2, 3, 3, 12), dict(num_groups=None, group_size=4, epsilon=1e-5, **A), {}),
    ("default_g32", (2, 3, 3, 64), dict(num_groups=NG, **A), {}),
    ("scale_only", (2, 3, 3, 8), dict(num_groups=2, use_scale=True, use_bias=False), {}),
    ("bias_only", (2, 3, 3, 8), dict(num_groups=2, use_scale=False, use_bias=True), {}),
    ("big_eps", (2, 3, 3, 8), dict(num_groups=2, epsilon=0.1, **A), dict(data="small_std")),
    ("f16_in_f32_params", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, **A), dict(inp="f16")),
    ("f16_in_f16_params", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, param_dtype="f16", **A), dict(inp="f16")),
    ("bf16_in_f32_params", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, **A), dict(inp="bf16")),
    ("bf16_in_bf16_params", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, param_dtype="bf16", **A), dict(inp="bf16")),
    ("bf16_no_affine", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, **NA), dict(inp="bf16")),
    ("dtype_f32_bf16_in", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, dtype="f32", param_dtype="bf16", **A), dict(inp="bf16")),
    ("dtype_bf16_f32_in", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, dtype="bf16", **A), {}),
    ("dtype_f16_f16_in", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, dtype="f16", **A), dict(inp="f16")),
    ("exact_variance", (2, 6, 6, 16), dict(num_groups=4, epsilon=1e-5, use_fast_variance=False, **A), {}),
    ("large_mean_exact", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, use_fast_variance=False, **A), dict(data="large_mean")),
    ("large_mean_fast", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, **A), dict(data="large_mean")),
    ("f16_no_force_f32", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-3, force_float32_reductions=False, **A), dict(inp="f16")),
    ("f16_no_force_f16_params", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-3, force_float32_reductions=False, param_dtype="f16", **A), dict(inp="f16")),
    ("bf16_no_force_bf16_params", (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-3, force_float32_reductions=False, param_dtype="bf16", **A), dict(inp="bf16")),
    ("nchw_basic", (2, 6, 5, 16), dict(num_groups=4, epsilon=1e-5, **A), dict(nchw=True)),
    ("nchw_mask", (2, 5, 4, 12), dict(num_groups=3, epsilon=1e-5, **A), dict(nchw=True, mask="random")),
    ("nchw_red_axes", (3, 4, 5, 8), dict(num_groups=2, epsilon=1e-5, reduction_axes=(2, 3), **A), dict(nchw=True)),
    ("nchw_3d", (2, 7, 12), dict(num_groups=3, epsilon=1e-5, **A), dict(nchw=True)),
    ("mask_bcast_1hwc", (2, 4, 4, 8), dict(num_groups=2, epsilon=1e-5, **A), dict(mask="bcast:1,4,4,8")),
    ("mask_bcast_hwc", (2, 4, 4, 8), dict(num_groups=2, epsilon=1e-5, **A), dict(mask="bcast:4,4,8")),
    ("mask_bcast_n11c", (2, 4, 4, 8), dict(num_groups=2, epsilon=1e-5, **A), dict(mask="bcast:2,1,1,8")),
    ("all_masked_cell", (3, 4, 4, 8), dict(num_groups=2, epsilon=1e-5, **A), dict(mask="all_masked")),
    ("single_valid_cell", (3, 4, 4, 8), dict(num_groups=2, epsilon=1e-5, **A), dict(mask="single_valid")),
    ("input_2d", (6, 12), dict(num_groups=3, epsilon=1e-5, **A), {}),
    ("input_3d", (3, 10, 12), dict(num_groups=4, epsilon=1e-5, **A), {}),
    ("moderate_2x8x8x64", (2, 8, 8, 64), dict(num_groups=8, **A), {}),
]

# pmap cases: name, P, axis_index_groups, per-device NHWC shape, GroupNorm kwargs
PMAP_CASES = [
    ("p4_groups_fast", 4, [[0, 2], [1, 3]], (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5)),
    ("p4_groups_exact", 4, [[0, 2], [1, 3]], (2, 4, 4, 16), dict(num_groups=4, epsilon=1e-5, use_fast_variance=False)),
    ("p4_all_3d_exact", 4, None, (2, 3, 8), dict(num_groups=2, epsilon=1e-5, use_fast_variance=False)),
    ("p2_all_fast", 2, None, (1, 4, 4, 8), dict(num_groups=2, epsilon=1e-5)),
    ("p8_groups_fast", 8, [[0, 1, 2, 3], [4, 5, 6, 7]], (2, 2, 2, 8), dict(num_groups=2, epsilon=1e-5)),
]


def rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def to_np(a):
    """jax/ml_dtypes array -> numpy array as stored: bf16 -> f32, others unchanged, little-endian C order."""
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        a = a.astype(np.float32)
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")))


def save(folder, rel, key, arr, files):
    np.save(folder / rel / f"{key}.npy", to_np(arr))
    files[key] = f"{rel}/{key}.npy"


def make_x(rng, shape, kind):
    z = rng.standard_normal(shape)
    if kind == "large_mean":   # |mean|/std ~ 1e3
        return (1000.0 + z).astype(np.float32)
    if kind == "small_std":    # std comparable to sqrt(epsilon)
        return (0.3 + 0.2 * z).astype(np.float32)
    chan = rng.standard_normal(shape[-1]) * 0.5          # per-channel offsets
    return (0.3 + chan + 1.5 * z).astype(np.float32)


def make_mask(rng, shape, spec, G):
    if spec.startswith("bcast:"):
        return rng.random(tuple(int(s) for s in spec[6:].split(","))) < 0.7
    m = rng.random(shape) < 0.7
    S = shape[-1] // G
    if spec == "all_masked":     # cell (n=0, g=1) has no valid element
        m[0, ..., S:2 * S] = False
    if spec == "single_valid":   # cell (n=1, g=0) has exactly one valid element
        m[1, ..., 0:S] = False
        m[(1,) + (0,) * (len(shape) - 2) + (S - 1,)] = True
    return m


def gn_kwargs(kw):
    kw = dict(kw)
    for k in ("dtype", "param_dtype"):
        if k in kw:
            kw[k] = DT[kw[k]]
    if kw.get("num_groups") is NG:
        del kw["num_groups"]
    return kw


def forward_backward(model, x, dy, mask, scale, bias):
    """y = model(x), and grads of sum(y * dy) w.r.t. x and params."""
    params = model.init(jax.random.key(0), x, mask=mask).get("params", {})
    if "scale" in params:
        params["scale"] = jnp.asarray(scale, params["scale"].dtype)
    if "bias" in params:
        params["bias"] = jnp.asarray(bias, params["bias"].dtype)

    def loss(x, p):
        y = model.apply({"params": p}, x, mask=mask)
        cot = dy.astype(y.dtype)
        return jnp.sum(y * cot), y

    (dx, dp), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, dx, params, dp


def exactly_representable_dy(rng, shape, in_dt, out_dt):
    dy = rng.standard_normal(shape).astype(np.float32)
    dy = np.asarray(jnp.asarray(dy, out_dt).astype(jnp.float32))   # round through the output dtype
    dy = jnp.asarray(dy, in_dt)
    assert np.array_equal(np.asarray(dy.astype(out_dt).astype(in_dt).astype(jnp.float32)),
                          np.asarray(dy.astype(jnp.float32)), equal_nan=True)
    return dy


def nhwc_to_nchw(a):
    return np.moveaxis(np.asarray(a), -1, 1) if a is not None else None


def run_single(name, shape, kw, opt):
    rng = rng_for(name)
    G = kw.get("num_groups") or shape[-1] // kw["group_size"]
    G = 32 if G is NG else G
    in_dt = DT[opt.get("inp", "f32")]
    x = make_x(rng, shape, opt.get("data", "normal"))
    mask = None
    if "mask" in opt:
        mask = make_mask(rng, shape, "random" if opt["mask"] == "nan" else opt["mask"], G)
        if opt["mask"] == "nan":
            x = np.where(mask, x, np.nan).astype(np.float32)
        elif not opt["mask"].startswith("bcast"):
            x = np.where(mask, x, x + 50.0).astype(np.float32)   # garbage at invalid positions
    C = shape[-1]
    scale = (1.0 + 0.5 * rng.standard_normal(C)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(C)).astype(np.float32)
    model = nn.GroupNorm(**gn_kwargs(kw))
    xj = jnp.asarray(x, in_dt)
    out_dt = jax.eval_shape(lambda a: model.init_with_output(jax.random.key(0), a, mask=mask)[0], xj).dtype
    dy = exactly_representable_dy(rng, shape, in_dt, out_dt)
    y, dx, params, dp = forward_backward(model, xj, dy, None if mask is None else jnp.asarray(mask), scale, bias)
    assert y.dtype == out_dt and dx.dtype == in_dt
    if name == "instancenorm_gs1":
        check_against_numpy(xj, y, params, axes=(1, 2), eps=kw["epsilon"])
    if name == "layernorm_g1":
        check_against_numpy(xj, y, params, axes=(1, 2, 3), eps=1e-6)

    nchw = opt.get("nchw", False)
    tr = nhwc_to_nchw if nchw else (lambda a: a)
    (OUT / name).mkdir(parents=True)
    files = {}
    for key, arr in (("x", xj), ("dy", dy), ("y", y), ("dx", dx)):
        save(OUT, name, key, tr(to_np(arr)), files)
    if mask is not None:
        assert mask.ndim == len(shape) or not nchw
        save(OUT, name, "mask", tr(mask), files)
    for k in ("scale", "bias"):
        if k in params:
            save(OUT, name, k, params[k], files)
            save(OUT, name, "d" + k, dp[k], files)
    ra = kw.get("reduction_axes")
    if ra is not None and nchw:
        nd = len(shape)
        ra = sorted(0 if a % nd == 0 else 1 if a % nd == nd - 1 else a % nd + 1 for a in ra)
    return {
        "name": name, "shape": list(tr(np.empty(shape)).shape),
        "num_groups": None if kw.get("num_groups") is None else G, "group_size": kw.get("group_size"),
        "epsilon": kw.get("epsilon", 1e-6), "dtype": kw.get("dtype"), "param_dtype": kw.get("param_dtype", "f32"),
        "use_bias": kw.get("use_bias", True), "use_scale": kw.get("use_scale", True),
        "reduction_axes": None if ra is None else list(ra),
        "use_fast_variance": kw.get("use_fast_variance", True),
        "force_float32_reductions": kw.get("force_float32_reductions", True),
        "layout": "nchw" if nchw else "nhwc", "input_dtype": DT_NAME[np.dtype(in_dt)],
        "output_dtype": DT_NAME[np.dtype(y.dtype)], "files": files,
    }


def check_against_numpy(x, y, params, axes, eps):
    """Sanity: instance norm (group_size=1) / layer norm (num_groups=1) in float64 numpy."""
    x = np.asarray(x, np.float64)
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    ref = (x - mu) / np.sqrt(var + eps) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    err = np.abs(ref - np.asarray(y, np.float64)).max()
    assert err < 1e-4, err
    print(f"  sanity vs numpy (axes {axes}): max abs err {err:.2e}")


def pmap_reference(model_kw, groups, P, xs, dys, params):
    """Same grouped statistics without pmap: stack each device group on a new reduced axis."""
    groups = groups or [list(range(P))]
    model = nn.GroupNorm(**model_kw, reduction_axes=tuple(range(1, xs.ndim)))

    def total_loss(xs, p):
        ys = [None] * P
        for g in groups:
            xg = jnp.moveaxis(xs[jnp.array(g)], 0, 1)          # (N, members, ..., C)
            yg = jnp.moveaxis(model.apply({"params": p}, xg), 1, 0)
            for i, d in enumerate(g):
                ys[d] = yg[i]
        y = jnp.stack(ys)
        return jnp.sum(y * dys), y

    (dx, dp), y = jax.grad(total_loss, argnums=(0, 1), has_aux=True)(xs, params)
    return y, dx, dp


def gradient_semantics_check(kw, groups, P, xs, dys, params, dx):
    """Show that pmap's dx is d(total loss)/d(local x): finite differences of the total loss at a few
    elements, and the distance to the gradient of the device-local loss alone (which must be large)."""
    def total(xs_):
        y = pmap_reference(kw, groups, P, jnp.asarray(xs_), jnp.asarray(dys), params)[0]
        return float(np.sum(np.asarray(y, np.float64) * dys))
    fd_err, h = 0.0, 1e-2
    for idx in [(0,) * xs.ndim, (P - 1,) + tuple(s - 1 for s in xs.shape[1:]), (1, 0, 1, 1, 3)[:xs.ndim]]:
        xp, xm = xs.copy(), xs.copy()
        xp[idx] += h
        xm[idx] -= h
        fd_err = max(fd_err, abs((total(xp) - total(xm)) / (2 * h) - float(dx[idx])))
    local = 0.0
    for d in range(P):
        dl = np.zeros_like(dys)
        dl[d] = dys[d]
        rdx = pmap_reference(kw, groups, P, jnp.asarray(xs), jnp.asarray(dl), params)[1]
        local = max(local, float(np.abs(np.asarray(rdx)[d] - dx[d]).max()))
    print(f"  finite-difference err {fd_err:.1e}; distance to local-loss-only gradient {local:.2f}")
    return (f"On {P} devices with groups {groups}: central finite differences (float32, h=1e-2) of the total loss "
            f"agree with pmap's dx to {fd_err:.1e}, while the gradient of each device's own loss alone differs "
            f"from pmap's dx by up to {local:.2f}.")


def run_pmap(name, P, groups, shape, kw):
    rng = rng_for(name)
    C = shape[-1]
    xs = np.stack([make_x(rng, shape, "normal") + 0.5 * d for d in range(P)]).astype(np.float32)
    dys = rng.standard_normal((P,) + shape).astype(np.float32)
    params = {"scale": jnp.asarray(1.0 + 0.5 * rng.standard_normal(C), jnp.float32),
              "bias": jnp.asarray(0.5 * rng.standard_normal(C), jnp.float32)}
    model = nn.GroupNorm(**kw, axis_name="batch", axis_index_groups=groups)

    def step(x, dy, p):
        def loss(x, p):
            y = model.apply({"params": p}, x)
            return jnp.sum(y * dy), y
        (dx, dp), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, p)
        return y, dx, dp

    y, dx, dp = jax.pmap(step, axis_name="batch", in_axes=(0, 0, None),
                         devices=jax.devices()[:P])(xs, dys, params)
    ry, rdx, rdp = pmap_reference(kw, groups, P, jnp.asarray(xs), jnp.asarray(dys), params)
    err = {"y": float(np.abs(np.asarray(y) - ry).max()), "dx": float(np.abs(np.asarray(dx) - rdx).max()),
           "dscale_sum": float(np.abs(np.asarray(dp["scale"]).sum(0) - rdp["scale"]).max()),
           "dbias_sum": float(np.abs(np.asarray(dp["bias"]).sum(0) - rdp["bias"]).max())}
    print(f"  pmap vs non-pmap total-loss reference, max abs diff: {err}")
    assert max(err.values()) < 1e-3, err
    fd_note = gradient_semantics_check(kw, groups, P, xs, dys, params, np.asarray(dx)) if name == "p4_groups_fast" else ""
    (OUT_PMAP / name).mkdir(parents=True)
    files = {}
    for key, arr in (("x", xs), ("dy", dys), ("y", y), ("dx", dx), ("scale", params["scale"]),
                     ("bias", params["bias"]), ("dscale", dp["scale"]), ("dbias", dp["bias"])):
        save(OUT_PMAP, name, key, arr, files)
    return err, fd_note, {
        "name": name, "ranks": P, "axis_index_groups": groups, "shape": [P, *shape],
        "num_groups": kw["num_groups"], "group_size": None, "epsilon": kw["epsilon"], "dtype": None,
        "param_dtype": "f32", "use_bias": True, "use_scale": True, "reduction_axes": None,
        "use_fast_variance": kw.get("use_fast_variance", True), "force_float32_reductions": True,
        "layout": "nhwc", "input_dtype": "f32", "output_dtype": DT_NAME[np.dtype(y.dtype)], "files": files,
    }


NOTES = (
    "bfloat16 arrays are stored as float32 (exact); float16 as '<f2'. x/dy/dx have input_dtype, y output_dtype, "
    "scale/bias/dscale/dbias param_dtype. dy is chosen exactly representable in both input and output dtype; "
    "gradients are jax.grad of sum(y * dy.astype(y.dtype)). 'shape' is the stored x shape (for nchw: channels on axis 1; "
    "Flax ran on the NHWC transpose and x, dy, y, dx, mask were moved back). force_float32_reductions exists in this "
    "flax version. Masks: False = invalid. mask_nan: x is NaN at invalid positions; y is finite at valid positions but "
    "every gradient of a cell with a NaN is NaN (dy*(x-mean) at the NaN positions enters the backward sums); mask_finite "
    "has garbage (+50) instead of NaN. Broadcast masks (1,H,W,C), (H,W,C), (N,1,1,C) are accepted by Flax "
    "(stored with their own shape). all_masked_cell: cell (n=0, g=1) fully invalid -> Flax gives NaN y there and NaN "
    "dx for that cell, NaN dscale for that group's channels. single_valid_cell: cell (n=1, g=0) has one valid element "
    "(var 0). num_groups is stored resolved (32 for default_g32); null when group_size is used. 'shape' and "
    "the manifest notes are extras beyond the fixed fields."
)


def main():
    for d in (OUT, OUT_PMAP):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    versions = {"generator": "scripts/gen_flax_golden.py", "flax_version": flax.__version__,
                "jax_version": jax.__version__}
    cases = []
    for name, shape, kw, opt in CASES:
        print(name)
        cases.append(run_single(name, shape, kw, opt))
    with open(OUT / "manifest.json", "w") as f:
        json.dump({**versions, "notes": NOTES, "cases": cases}, f, indent=1)
        f.write("\n")
    pcases, errs, fd_notes = [], {}, ""
    for name, P, groups, shape, kw in PMAP_CASES:
        print(name)
        err, fd_note, case = run_pmap(name, P, groups, shape, kw)
        fd_notes += fd_note
        errs[name] = max(err.values())
        pcases.append(case)
    pnotes = (
        "jax.pmap over the leading axis (devices = 8 forced host CPU devices), GroupNorm(axis_name='batch', "
        "axis_index_groups=...), params replicated (in_axes=None); device d's x has +0.5*d added. Gradients: "
        "jax.grad inside the pmap of the per-device loss sum(y*dy). Checked against a non-pmap computation of the "
        "same grouped statistics (each device group stacked on an extra reduced axis) differentiating the TOTAL loss "
        "sum over all devices: dx from pmap equals d(total loss)/d(local x); dscale/dbias stored per device are that "
        "device's local partial sums and their sum over devices equals the total-loss gradient. Max abs differences "
        "(y, dx, summed dscale/dbias) per case: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ". " + fd_notes
    )
    with open(OUT_PMAP / "manifest.json", "w") as f:
        json.dump({**versions, "notes": pnotes, "cases": pcases}, f, indent=1)
        f.write("\n")
    print("done")


if __name__ == "__main__":
    main()
