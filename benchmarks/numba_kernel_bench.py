"""Scratch benchmark: the Numba kernels composed into each norm, against torch, in one process.

    python benchmarks/numba_kernel_bench.py [--threads 2] [--rounds 15] [--only SUBSTR]
    python benchmarks/numba_kernel_bench.py --fused [--rounds 41]   # fused kernels only

Every case is timed by alternating torch and normkit samples (each sample a loop long
enough to be >= ~2 ms) so that machine noise hits both alike; medians are reported.
Outputs are allocated inside the timed call on both sides (torch allocates its own).
"bytes" is what must move between memory and the cores at the least: for example
BatchNorm training forward reads x twice (statistics, then normalize) and writes y.

Not collected by pytest (no test_ functions); it is a script.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import torch
import torch.nn.functional as F

from normkit.backends import numba_backend as nb


# ------------------------------------------------------------ compositions of kernels
def bn_eval_nchw(x4, rm, rv, w, b, eps=1e-5):
    N, C = x4.shape[:2]
    x = x4.reshape(N, C, -1)
    rstd = 1.0 / np.sqrt(rv + eps)
    scale = (w * rstd).astype(x.dtype)[None]
    out = np.empty_like(x)
    nb.channels_first_affine(x, rm.astype(x.dtype)[None], scale, b[None], out)
    return out.reshape(x4.shape)


def bn_eval_nhwc(x4, rm, rv, w, b, eps=1e-5):
    C = x4.shape[-1]
    x = x4.reshape(1, -1, C)
    rstd = 1.0 / np.sqrt(rv + eps)
    scale = (w * rstd).astype(x.dtype)[None]
    out = np.empty_like(x)
    nb.channels_last_affine(x, rm.astype(x.dtype)[None], scale, b[None], out)
    return out.reshape(x4.shape)


def _merge_planes(mean, m2, N, C, S):
    """(N*C,) plane moments -> per-channel mean and biased variance (Chan, vectorized)."""
    mean = mean.reshape(N, C)
    m2 = m2.reshape(N, C)
    mu = mean.mean(axis=0)
    m2c = m2.sum(axis=0) + S * ((mean - mu) ** 2).sum(axis=0)
    return mu, m2c / (N * S)


def bn_train_fwd(x4, w, b, eps=1e-5, out=None):
    N, C = x4.shape[:2]
    x = x4.reshape(N, C, -1)
    S = x.shape[2]
    pm, pq = nb.plane_moments(x.reshape(N * C, S))
    mu, var = _merge_planes(pm, pq, N, C, S)
    rstd = 1.0 / np.sqrt(var + eps)
    out = np.empty_like(x) if out is None else out.reshape(x.shape)
    dt = x.dtype
    nb.channels_first_affine(x, mu.astype(dt)[None], (w * rstd).astype(dt)[None], b[None], out)
    return out.reshape(x4.shape), mu, rstd


def bn_train_bwd(dy4, x4, mu, rstd, w, dx=None):
    N, C = x4.shape[:2]
    x = x4.reshape(N, C, -1)
    dy = dy4.reshape(N, C, -1)
    M = N * x.shape[2]
    dt = x.dtype
    shift = mu.astype(dt)[None]
    s1, s2 = nb.channels_first_grad_sums(dy, x, shift)
    sdy = s1.sum(axis=0)
    sdyx = s2.sum(axis=0)
    wr = w * rstd
    coef_dy = wr
    coef_x = -wr * rstd * rstd * sdyx / M
    coef_1 = -wr * sdy / M
    dx = np.empty_like(x) if dx is None else dx.reshape(x.shape)
    nb.channels_first_grad_apply(dy, x, shift, coef_dy.astype(dt)[None], coef_x.astype(dt)[None],
                                 coef_1.astype(dt)[None], dx)
    return dx.reshape(x4.shape), sdyx * rstd, sdy


def bn_train_fwd_bwd(x4, dy4, w, b, out=None, dx=None):
    y, mu, rstd = bn_train_fwd(x4, w, b, out=out)
    return bn_train_bwd(dy4, x4, mu, rstd, w, dx=dx)


def layer_norm(x, w, b, rms=False, eps=1e-5):
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    out = np.empty_like(x2)
    nb.rows_forward(x2, w, b, eps, rms, out)
    return out.reshape(x.shape)


def group_norm(x4, G, w, b, eps=1e-5):
    N, C = x4.shape[:2]
    x = x4.reshape(N, C, -1)
    mean, m2 = nb.plane_moments(x4.reshape(N * G, -1))
    cnt = x.size // (N * G)
    rstd = 1.0 / np.sqrt(m2 / cnt + eps)
    dt = x.dtype
    shift = np.repeat(mean.reshape(N, G), C // G, axis=1).astype(dt)
    scale = (np.repeat(rstd.reshape(N, G), C // G, axis=1) * w).astype(dt)
    offset = np.ascontiguousarray(np.broadcast_to(b, (N, C)), dtype=dt)
    out = np.empty_like(x)
    nb.channels_first_affine(x, shift, scale, offset, out)
    return out.reshape(x4.shape)


def group_norm_fused(x4, G, w, b, eps=1e-5):
    """GroupNorm/InstanceNorm through the one fused kernel (x read from memory once)."""
    N, C = x4.shape[:2]
    x = x4.reshape(N, C, -1)
    out = np.empty_like(x)
    nb.channels_first_group_forward(x, G, w, b, eps, out)
    return out.reshape(x4.shape)


def bn_eval_nchw_act(x4, rm, rv, w, b, residual=None, relu=True, eps=1e-5):
    """relu(bn(x) [+ residual]) in one pass (channels_first_affine_act)."""
    N, C = x4.shape[:2]
    x = x4.reshape(N, C, -1)
    rstd = 1.0 / np.sqrt(rv + eps)
    scale = (w * rstd).astype(x.dtype)[None]
    out = np.empty_like(x)
    r = None if residual is None else residual.reshape(x.shape)
    nb.channels_first_affine_act(x, rm.astype(x.dtype)[None], scale, b[None], r, relu, out)
    return out.reshape(x4.shape)


# ------------------------------------------------------------ timing
def _loop(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def compare(fns, rounds):
    """Alternate samples of each fn; return (median, min) seconds per call for each."""
    for fn in fns:                       # warm-up (and compile)
        for _ in range(3):
            fn()
    one = min(_loop(fn, 3) for fn in fns)
    reps = max(1, int(1e-3 / max(one, 1e-7)))   # samples of >= ~1 ms, finely interleaved
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            samples[i].append(_loop(fn, reps))
    return [(float(np.median(s)), float(np.min(s))) for s in samples]


_STARTUP = r"""
import time, sys
t0 = time.perf_counter()
import normkit
t1 = time.perf_counter()
import numpy as np
from normkit.backends import numba_backend as nb
t2 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((32, 128, 768)).astype(np.float32).reshape(-1, 768)
w = np.ones(768, np.float32); b = np.zeros(768, np.float32); out = np.empty_like(x)
t3 = time.perf_counter()
nb.rows_forward(x, w, b, 1e-5, False, out)       # LayerNorm: one parallel kernel
t4 = time.perf_counter()
nb.rows_forward(x[:1], w, b, 1e-5, False, out[:1])  # its serial twin
t5 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t4 - t3:.3f} {t5 - t4:.3f} {t4 - t3 + t2 - t1:.3f}")
"""


def startup(runs):
    """import normkit, then the first kernel call, in fresh processes: cold and warm cache."""
    import os
    import subprocess
    import sys
    import tempfile
    print("seconds: import normkit | import numba backend | first parallel call | "
          "first serial call | backend import + first call")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for i in range(runs + 1):
            label = "cold cache" if i == 0 else "warm cache"
            out = subprocess.run([sys.executable, "-c", _STARTUP], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            print(f"{label:10s} " + "  ".join(f"{v:>7s}" for v in out), flush=True)


def fused_cases(args, dt, tdt, rng):
    """The fused kernels against the unfused path they replace and against torch.

    Every implementation of a case is sampled in turn (interleaved rounds), outputs
    allocated inside the call on every side. GB/s is the least traffic of the *task*
    (the same for every implementation: GN and BN+ReLU read x and write y, the residual
    case also reads r), so it compares like with like.
    """
    table = []

    def run(title, nbytes, entries, check=None):
        if args.only and args.only not in title:
            return
        ts = compare([fn for _, fn in entries], args.rounds)
        t_torch = ts[0][0]
        for (label, _), (med, mn) in zip(entries, ts):
            table.append((title, label, med, mn, nbytes / med / 1e9, med / t_torch))
            print(f"{title:34s} {label:34s} {med * 1e3:8.3f} ms (min {mn * 1e3:.3f})  "
                  f"{nbytes / med / 1e9:6.1f} GB/s  /torch {med / t_torch:5.2f}", flush=True)
        if check is not None:
            check()

    def arr(*shape):
        return rng.standard_normal(shape).astype(dt)

    def close(a, b, tol=None):
        tol = tol or (2e-4 if dt == np.float32 else 1e-9)
        b = b.detach().numpy() if hasattr(b, "detach") else b
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)

    for shape, G in [((32, 64, 56, 56), 32), ((8, 256, 28, 28), 32), ((8, 64, 56, 56), 64)]:
        C = shape[1]
        x = arr(*shape)
        w, b = arr(C), arr(C)
        tx, tw, tb = map(torch.from_numpy, (x, w, b))
        kind = "IN" if G == C else f"GN{G}"
        run(f"{kind} {shape}", 2 * x.nbytes, [
            ("torch F.group_norm", lambda: F.group_norm(tx, G, tw, tb)),
            ("fused channels_first_group_forward", lambda: group_norm_fused(x, G, w, b)),
            ("plane_moments + channels_first_affine", lambda: group_norm(x, G, w, b)),
        ], lambda: (close(group_norm_fused(x, G, w, b), F.group_norm(tx, G, tw, tb)),
                    close(group_norm(x, G, w, b), F.group_norm(tx, G, tw, tb))))

    shape = (32, 64, 56, 56)
    C = shape[1]
    x, r = arr(*shape), arr(*shape)
    w, b, rm = arr(C), arr(C), arr(C)
    rv = (np.abs(arr(C)) + 0.5).astype(dt)
    tx, tr, tw, tb, trm, trv = map(torch.from_numpy, (x, r, w, b, rm, rv))

    def t_bn():
        return F.batch_norm(tx, trm, trv, tw, tb, False)

    run(f"BN eval NCHW {shape}", 2 * x.nbytes, [
        ("torch batch_norm", t_bn),
        ("channels_first_affine", lambda: bn_eval_nchw(x, rm, rv, w, b)),
        ("affine_act(None, relu=False)", lambda: bn_eval_nchw_act(x, rm, rv, w, b, None, False)),
    ], lambda: close(bn_eval_nchw_act(x, rm, rv, w, b, None, False), t_bn()))
    run(f"BN eval + ReLU NCHW {shape}", 2 * x.nbytes, [
        ("torch relu(batch_norm) (2 ops)", lambda: F.relu(t_bn())),
        ("affine_act(relu)", lambda: bn_eval_nchw_act(x, rm, rv, w, b, None, True)),
        ("channels_first_affine", lambda: bn_eval_nchw(x, rm, rv, w, b)),
    ], lambda: close(bn_eval_nchw_act(x, rm, rv, w, b, None, True), F.relu(t_bn())))
    run(f"BN eval + res + ReLU NCHW {shape}", 3 * x.nbytes, [
        ("torch relu(bn(x) + r) (3 ops)", lambda: F.relu(t_bn() + tr)),
        ("torch bn(x).add_(r).relu_()", lambda: t_bn().add_(tr).relu_()),
        ("affine_act(residual, relu)", lambda: bn_eval_nchw_act(x, rm, rv, w, b, r, True)),
        ("channels_first_affine", lambda: bn_eval_nchw(x, rm, rv, w, b)),
    ], lambda: close(bn_eval_nchw_act(x, rm, rv, w, b, r, True), F.relu(t_bn() + tr)))

    print()
    print(f"threads={args.threads}, {args.dtype}, layer={nb.info()['threading_layer']}, "
          f"medians of {args.rounds} interleaved samples (min in brackets)")
    print("| case | implementation | ms | GB/s | time / torch |")
    print("| --- | --- | ---: | ---: | ---: |")
    for title, label, med, mn, gbs, ratio in table:
        print(f"| {title} | {label} | {med * 1e3:.3f} [{mn * 1e3:.3f}] | {gbs:.1f} | {ratio:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fused", action="store_true",
                    help="only the fused kernels (GroupNorm forward, affine + residual + ReLU)")
    ap.add_argument("--startup", type=int, default=0,
                    help="only time import and first calls in N warm fresh processes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--only", default="")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.startup:
        return startup(args.startup)
    torch.set_num_threads(args.threads)
    nb.set_num_threads(args.threads)
    dt = np.dtype(args.dtype)
    tdt = getattr(torch, args.dtype)
    rng = np.random.default_rng(0)
    if args.fused:
        return fused_cases(args, dt, tdt, rng)

    rows = []

    def case(name, nbytes, ours, theirs, check=None, copy=None, prealloc=None):
        """prealloc: the same kernels writing into preallocated outputs (no page faults)."""
        if args.only and args.only not in name:
            return
        extra_fns = [f for f in (copy, prealloc) if f is not None]
        ts = compare([theirs, ours] + extra_fns, args.rounds)
        (t_t, m_t), (t_o, m_o) = ts[0], ts[1]
        rest = iter(ts[2:])
        t_c = next(rest)[0] if copy is not None else None
        t_p = next(rest)[0] if prealloc is not None else None
        if check is not None:
            check()
        rows.append((name, t_o, t_t, nbytes, t_c, t_p, m_o, m_t))
        extra = f"  copyto {t_c * 1e3:7.3f} ms  ours/copy {t_o / t_c:5.2f}" if t_c else ""
        extra += f"  prealloc {t_p * 1e3:7.3f} ms" if t_p else ""
        print(f"{name:34s} ours {t_o * 1e3:8.3f} ms  torch {t_t * 1e3:8.3f} ms  "
              f"ratio {t_o / t_t:5.2f}  {nbytes / t_o / 1e9:6.1f} GB/s  "
              f"(min {m_o * 1e3:.3f} / {m_t * 1e3:.3f}){extra}", flush=True)

    def arr(*shape):
        return rng.standard_normal(shape).astype(dt)

    def close(a, b, tol=None):
        tol = tol or (2e-4 if dt == np.float32 else 1e-9)
        b = b.detach().numpy() if hasattr(b, "detach") else b
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)

    # ---- BatchNorm eval
    for shape in [(1, 64, 56, 56), (32, 64, 56, 56), (8, 256, 28, 28)]:
        C = shape[1]
        x = arr(*shape)
        w, b = arr(C), arr(C)
        rm = arr(C)
        rv = (np.abs(arr(C)) + 0.5).astype(dt)
        tx, tw, tb, trm, trv = map(torch.from_numpy, (x, w, b, rm, rv))
        o = np.empty_like(x)
        case(f"BN eval NCHW {shape}", 2 * x.nbytes,
             lambda: bn_eval_nchw(x, rm, rv, w, b),
             lambda: F.batch_norm(tx, trm, trv, tw, tb, False),
             lambda: close(bn_eval_nchw(x, rm, rv, w, b), F.batch_norm(tx, trm, trv, tw, tb, False)),
             copy=lambda: np.copyto(o, x))
        xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        txl = torch.from_numpy(xl).permute(0, 3, 1, 2)      # channels_last view
        assert txl.is_contiguous(memory_format=torch.channels_last)
        case(f"BN eval NHWC {shape}", 2 * x.nbytes,
             lambda: bn_eval_nhwc(xl, rm, rv, w, b),
             lambda: F.batch_norm(txl, trm, trv, tw, tb, False),
             lambda: close(bn_eval_nhwc(xl, rm, rv, w, b),
                           F.batch_norm(txl, trm, trv, tw, tb, False).permute(0, 2, 3, 1)),
             copy=lambda: np.copyto(o, x))

    # ---- BatchNorm train
    shape = (32, 64, 56, 56)
    x = arr(*shape)
    dy = arr(*shape)
    w, b = arr(64), arr(64)
    tx, tdy, tw, tb = map(torch.from_numpy, (x, dy, w, b))
    trm, trv = torch.zeros(64, dtype=tdt), torch.ones(64, dtype=tdt)
    ybuf, dxbuf = np.empty_like(x), np.empty_like(x)
    case(f"BN train fwd {shape}", 3 * x.nbytes,
         lambda: bn_train_fwd(x, w, b),
         lambda: F.batch_norm(tx, trm, trv, tw, tb, True),
         lambda: close(bn_train_fwd(x, w, b)[0], F.batch_norm(tx, None, None, tw, tb, True)),
         prealloc=lambda: bn_train_fwd(x, w, b, out=ybuf))
    txg = tx.clone().requires_grad_()
    twg = tw.clone().requires_grad_()
    tbg = tb.clone().requires_grad_()

    def torch_fb():
        txg.grad = twg.grad = tbg.grad = None
        F.batch_norm(txg, trm, trv, twg, tbg, True).backward(tdy)

    def check_fb():
        dx, dw, db = bn_train_fwd_bwd(x, dy, w, b)
        torch_fb()
        close(dx, txg.grad, 1e-3)
        close(dw, twg.grad.double(), 1e-2)
        close(db, tbg.grad.double(), 1e-2)

    case(f"BN train fwd+bwd {shape}", 8 * x.nbytes,
         lambda: bn_train_fwd_bwd(x, dy, w, b), torch_fb, check_fb,
         prealloc=lambda: bn_train_fwd_bwd(x, dy, w, b, out=ybuf, dx=dxbuf))

    # ---- LayerNorm / RMSNorm
    for shape in [(1, 128, 768), (32, 128, 768), (4096, 1024), (1, 8)]:
        K = shape[-1]
        x = arr(*shape)
        w, b = arr(K), arr(K)
        tx, tw, tb = map(torch.from_numpy, (x, w, b))
        case(f"LN {shape}", 2 * x.nbytes,
             lambda: layer_norm(x, w, b),
             lambda: F.layer_norm(tx, (K,), tw, tb),
             lambda: close(layer_norm(x, w, b), F.layer_norm(tx, (K,), tw, tb)))
    shape = (32, 128, 768)
    x = arr(*shape)
    w = arr(768)
    z = np.zeros(768, dt)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    case(f"RMSNorm {shape}", 2 * x.nbytes,
         lambda: layer_norm(x, w, z, rms=True),
         lambda: F.rms_norm(tx, (768,), tw, 1e-5),
         lambda: close(layer_norm(x, w, z, rms=True), F.rms_norm(tx, (768,), tw, 1e-5)))

    # ---- GroupNorm
    for shape in [(32, 64, 56, 56), (8, 256, 28, 28)]:
        C = shape[1]
        x = arr(*shape)
        w, b = arr(C), arr(C)
        tx, tw, tb = map(torch.from_numpy, (x, w, b))
        case(f"GN32 {shape}", 3 * x.nbytes,
             lambda: group_norm(x, 32, w, b),
             lambda: F.group_norm(tx, 32, tw, tb),
             lambda: close(group_norm(x, 32, w, b), F.group_norm(tx, 32, tw, tb)))

    print()
    print(f"threads={args.threads}, {args.dtype}, layer={nb.info()['threading_layer']}, "
          f"medians of {args.rounds} alternating samples (min in brackets)")
    print("| case | normkit-numba ms | torch ms | ratio | GB/s | np.copyto ms (ours/copy) "
          "| ours, outputs preallocated ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t_o, t_t, nbytes, t_c, t_p, m_o, m_t in rows:
        c = f"{t_c * 1e3:.3f} ({t_o / t_c:.2f})" if t_c else ""
        pa = f"{t_p * 1e3:.3f}" if t_p else ""
        print(f"| {name} | {t_o * 1e3:.3f} [{m_o * 1e3:.3f}] | {t_t * 1e3:.3f} [{m_t * 1e3:.3f}] "
              f"| {t_o / t_t:.2f} | {nbytes / t_o / 1e9:.1f} | {c} | {pa} |")


if __name__ == "__main__":
    main()
