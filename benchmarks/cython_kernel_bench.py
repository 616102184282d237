"""Scratch benchmark: the Cython backend's kernels, composed into whole norms, vs torch.

    python benchmarks/cython_kernel_bench.py [--threads 2] [--rounds 5] [--only SUBSTR]
    python benchmarks/cython_kernel_bench.py --threads 1 --kernels normkit.backends._cython_kernels

Everything runs in one process; torch and normkit use the same thread count. Each
case alternates rounds of torch / cython / np.copyto calls (so that load from other
processes hits all of them alike), and reports medians after warm-up. GB/s uses the
bytes model of normkit/_bench_cases.py (BN eval and LN/GN/RMS forward 2n, BN training
forward 3n, BN training fwd+bwd 8n; n = bytes of x).

The compositions are the minimum a public call needs: the kernels plus the O(C) NumPy
glue (per-channel scale/offset, merging per-plane moments into per-channel ones);
GroupNorm is the fused channels_first_group_forward (the two-kernel version is shown
under it).
Medians are what the comparison is about; the minimum of the same samples is printed
after "||" because on a loaded machine a 2-thread OpenMP region (torch's or ours)
waits whole scheduler slices for its second thread, which the medians then show.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

import normkit
from normkit.backends import resolve


def timeit(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(fns, rounds, target=0.15):
    """fns: name -> callable. Alternating rounds; median seconds per call per name."""
    reps = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()                                  # warm-up (and first-touch of outputs)
        t = min(timeit(fn, 3))
        reps[name] = max(3, min(2000, int(target / rounds / max(t, 1e-7))))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += timeit(fn, reps[name])
    out = {name: statistics.median(s) for name, s in samples.items()}
    out.update({"min " + name: min(s) for name, s in samples.items()})
    return out


# ---------------------------------------------------------------- compositions
def bn_params_eval(w, b, rm, rv, eps):
    scale = (w / np.sqrt(rv + eps)).astype(w.dtype)
    return rm[None, :], scale[None, :], b[None, :]


def make_bn_train_forward(be, x, w, b, eps=1e-5):
    n, c = x.shape[:2]
    s = x[0, 0].size
    x3 = x.reshape(n, c, s)
    planes = x.reshape(n * c, s)
    out = np.empty_like(x3)

    def run():
        pm, pm2 = be.plane_moments(planes)
        pm = pm.reshape(n, c)
        mean = pm.mean(axis=0)                                  # equal counts: Chan merge
        m2 = pm2.reshape(n, c).sum(axis=0) + s * ((pm - mean) ** 2).sum(axis=0)
        var = m2 / (n * s)
        rstd = 1.0 / np.sqrt(var + eps)
        scale = (w * rstd).astype(x.dtype)
        be.channels_first_affine(x3, mean.astype(x.dtype)[None], scale[None], b[None], out)
        return out, mean, rstd
    return run


def make_bn_train_fwd_bwd(be, x, dy, w, b, eps=1e-5):
    n, c = x.shape[:2]
    s = x[0, 0].size
    fwd = make_bn_train_forward(be, x, w, b, eps)
    x3 = x.reshape(n, c, s)
    dy3 = dy.reshape(n, c, s)
    dx = np.empty_like(x3)
    m = n * s

    def run():
        out, mean, rstd = fwd()
        shift = mean.astype(x.dtype)[None]
        sdy, sdyx = be.channels_first_grad_sums(dy3, x3, shift)
        sdy = sdy.sum(axis=0)
        sdyx = sdyx.sum(axis=0)
        wr = w * rstd
        coef_dy = wr.astype(x.dtype)[None]
        coef_x = (-wr * rstd * rstd * sdyx / m).astype(x.dtype)[None]
        coef_1 = (-wr * sdy / m).astype(x.dtype)[None]
        be.channels_first_grad_apply(dy3, x3, shift, coef_dy, coef_x, coef_1, dx)
        return out, dx, rstd * sdyx, sdy
    return run


def make_group_norm(be, x, groups, w, b, eps=1e-5):
    n, c = x.shape[:2]
    s = x[0, 0].size
    rows = x.reshape(n * groups, (c // groups) * s)
    x3 = x.reshape(n, c, s)
    out = np.empty_like(x3)
    rep = c // groups
    offset = np.broadcast_to(b, (n, c)).copy()

    def run():
        mean, m2 = be.plane_moments(rows)
        rstd = 1.0 / np.sqrt(m2 / rows.shape[1] + eps)
        shift = np.repeat(mean.reshape(n, groups), rep, axis=1).astype(x.dtype)
        scale = (np.repeat(rstd.reshape(n, groups), rep, axis=1) * w).astype(x.dtype)
        be.channels_first_affine(x3, shift, scale, offset, out)
        return out
    return run


# ---------------------------------------------------------------- per-build kernel table
def kernel_table(module_name, threads):
    """Bare kernels of one compiled build (e.g. normkit.backends._cython_kernels_avx2),
    minimum of 25 calls each: what the SIMD builds / -march=native buy."""
    import importlib
    mod = importlib.import_module(module_name)
    mod.set_num_threads(threads)
    rng = np.random.default_rng(0)

    def f32(*shape):
        return (rng.standard_normal(shape) + 0.5).astype(np.float32)
    x, dy = f32(32, 64, 3136), f32(32, 64, 3136)
    out = np.empty_like(x)
    p = [f32(1, 64) for _ in range(4)]
    xl, dyl = f32(1, 32 * 3136, 64), f32(1, 32 * 3136, 64)
    outl = np.empty_like(xl)
    r, dr, w, b = f32(4096, 768), f32(4096, 768), f32(768), f32(768)
    o2 = np.empty_like(r)
    mean, rstd = mod.rows_forward(r, w, b, 1e-5, False, o2)
    cases = {
        "plane_moments (2048,3136)": (lambda: mod.plane_moments(x.reshape(2048, 3136)), x.nbytes),
        "cf_affine (32,64,3136)": (lambda: mod.channels_first_affine(x, *p[:3], out), 2 * x.nbytes),
        "cf_grad_sums (32,64,3136)": (lambda: mod.channels_first_grad_sums(dy, x, p[0]), 2 * x.nbytes),
        "cf_grad_apply (32,64,3136)": (lambda: mod.channels_first_grad_apply(dy, x, *p, out),
                                       3 * x.nbytes),
        "cl_moments (1,100352,64)": (lambda: mod.channels_last_moments(xl), xl.nbytes),
        "cl_affine (1,100352,64)": (lambda: mod.channels_last_affine(xl, *p[:3], outl), 2 * xl.nbytes),
        "cl_grad_sums (1,100352,64)": (lambda: mod.channels_last_grad_sums(dyl, xl, p[0]),
                                       2 * xl.nbytes),
        "rows_forward LN (4096,768)": (lambda: mod.rows_forward(r, w, b, 1e-5, False, o2), 2 * r.nbytes),
        "rows_forward RMS (4096,768)": (lambda: mod.rows_forward(r, w, b, 1e-5, True, o2), 2 * r.nbytes),
        "rows_backward LN (4096,768)": (lambda: mod.rows_backward(dr, r, mean, rstd, w, False, o2),
                                        3 * r.nbytes),
    }
    print(f"# {module_name}: simd {mod.info()['simd']}, cflags {mod.info()['cflags']}, "
          f"threads {threads}")
    for name, (fn, nbytes) in cases.items():
        fn()
        t = min(timeit(fn, 25))
        print(f"{name:30s} {t * 1e3:8.3f} ms {nbytes / t / 1e9:6.1f} GB/s")


# ---------------------------------------------------------------- cases
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kernels", metavar="MODULE",
                    help="only the bare-kernel table of one build, e.g. "
                         "normkit.backends._cython_kernels (the portable one)")
    args = ap.parse_args()
    if args.kernels:
        return kernel_table(args.kernels, args.threads)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    normkit.set_num_threads(args.threads)
    be = resolve("cython")
    dt = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"# cython info: {be.info()}")
    print(f"# torch {torch.__version__}, threads {args.threads}, dtype {dt}, "
          f"loadavg {os.getloadavg()}")
    rows = []

    def report(name, nbytes, times, ref="torch"):
        t_c, t_r = times["cython"], times.get(ref)
        gbs = nbytes / t_c / 1e9
        line = (f"{name:38s} cython {t_c * 1e3:9.4f} ms {gbs:6.1f} GB/s | "
                f"{ref} {t_r * 1e3:9.4f} ms | ratio {t_c / t_r:5.2f}")
        if "copy" in times:
            line += f" | copyto {times['copy'] * 1e3:8.4f} ms, cython/copy {t_c / times['copy']:4.2f}"
        line += (f" || min: cython {times['min cython'] * 1e3:.4f} {ref} "
                 f"{times['min ' + ref] * 1e3:.4f} ratio {times['min cython'] / times['min ' + ref]:.2f}")
        print(line, flush=True)
        rows.append((name, t_c, gbs, t_r, t_c / t_r))

    def want(name):
        return args.only in name

    def randn(shape):
        return (rng.standard_normal(shape) * 2 + 0.5).astype(dt)

    # ---- BatchNorm eval, NCHW and NHWC
    for shape in [(1, 64, 56, 56), (32, 64, 56, 56), (8, 256, 28, 28)]:
        n, c, h, wd = shape
        w, b = randn(c), randn(c)
        rm, rv = randn(c), (rng.random(c) + 0.5).astype(dt)
        tw, tb, trm, trv = map(torch.from_numpy, (w, b, rm, rv))
        for layout in ("NCHW", "NHWC"):
            name = f"BN eval {layout} {shape}"
            if not want(name):
                continue
            if layout == "NCHW":
                x = randn(shape)
                x3 = x.reshape(n, c, h * wd)
                tx = torch.from_numpy(x)
                fn = be.channels_first_affine
            else:
                x = randn((n, h, wd, c))
                x3 = x.reshape(n, h * wd, c)
                tx = torch.from_numpy(x).permute(0, 3, 1, 2)     # channels-last view
                assert tx.is_contiguous(memory_format=torch.channels_last)
                fn = be.channels_last_affine
            out = np.empty_like(x3)
            dst = np.empty_like(x)

            def ours():
                fn(x3, *bn_params_eval(w, b, rm, rv, 1e-5), out)

            def theirs():
                with torch.inference_mode():
                    F.batch_norm(tx, trm, trv, tw, tb, False, 0.1, 1e-5)

            times = measure({"torch": theirs, "cython": ours,
                             "copy": lambda: np.copyto(dst, x)}, args.rounds)
            report(name, 2 * x.nbytes, times)

    # ---- BatchNorm training, NCHW (32, 64, 56, 56)
    shape = (32, 64, 56, 56)
    x = randn(shape)
    dy = randn(shape)
    c = shape[1]
    w, b = randn(c), randn(c)
    if want("BN train fwd "):
        tx = torch.from_numpy(x)
        trm, trv = torch.zeros(c), torch.ones(c)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        run = make_bn_train_forward(be, x, w, b)

        def theirs():
            with torch.inference_mode():
                F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
        report(f"BN train fwd {shape}", 3 * x.nbytes,
               measure({"torch": theirs, "cython": run}, args.rounds))
    if want("BN train fwd+bwd"):
        tx = torch.from_numpy(x).requires_grad_()
        tw = torch.from_numpy(w).requires_grad_()
        tb = torch.from_numpy(b).requires_grad_()
        tdy = torch.from_numpy(dy)
        trm, trv = torch.zeros(c), torch.ones(c)
        run = make_bn_train_fwd_bwd(be, x, dy, w, b)

        def theirs():
            y = F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
            torch.autograd.grad(y, (tx, tw, tb), tdy)
        report(f"BN train fwd+bwd {shape}", 8 * x.nbytes,
               measure({"torch": theirs, "cython": run}, args.rounds))
    del x, dy

    # ---- LayerNorm / RMSNorm
    for shape, rms in [((1, 128, 768), False), ((32, 128, 768), False), ((4096, 1024), False),
                       ((32, 128, 768), True)]:
        name = f"{'RMSNorm' if rms else 'LN'} {shape}"
        if not want(name):
            continue
        k = shape[-1]
        x = randn(shape)
        x2 = x.reshape(-1, k)
        w, b = randn(k), np.zeros(k, dt) if rms else randn(k)
        out = np.empty_like(x2)
        tx, tw, tb = map(torch.from_numpy, (x, w, b))

        def ours():
            be.rows_forward(x2, w, b, 1e-5, rms, out)

        if rms:
            def theirs():
                with torch.inference_mode():
                    F.rms_norm(tx, (k,), tw, 1e-5)
        else:
            def theirs():
                with torch.inference_mode():
                    F.layer_norm(tx, (k,), tw, tb, 1e-5)
        report(name, 2 * x.nbytes, measure({"torch": theirs, "cython": ours}, args.rounds))

    # ---- GroupNorm, 32 groups
    for shape in [(32, 64, 56, 56), (8, 256, 28, 28)]:
        name = f"GN 32 groups {shape}"
        if not want(name):
            continue
        x = randn(shape)
        c = shape[1]
        w, b = randn(c), randn(c)
        tx, tw, tb = map(torch.from_numpy, (x, w, b))
        two = make_group_norm(be, x, 32, w, b)
        x3 = x.reshape(shape[0], c, -1)
        out = np.empty_like(x3)

        def fused():
            return be.channels_first_group_forward(x3, 32, w, b, 1e-5, out)

        def theirs():
            with torch.inference_mode():
                F.group_norm(tx, 32, tw, tb, 1e-5)
        times = measure({"torch": theirs, "cython": fused, "two": two}, args.rounds)
        report(name, 2 * x.nbytes, times)
        print(f"{'':38s} (plane_moments + channels_first_affine instead: "
              f"{times['two'] * 1e3:.4f} ms, ratio {times['two'] / times['torch']:.2f})")

    # ---- per-call overhead of the bare kernels
    if want("overhead"):
        x = randn((1, 8))
        w, b = randn(8), randn(8)
        out = np.empty_like(x)
        tx, tw, tb = map(torch.from_numpy, (x, w, b))

        def theirs():
            with torch.inference_mode():
                F.layer_norm(tx, (8,), tw, tb, 1e-5)
        times = measure({"torch": theirs,
                         "cython": lambda: be.rows_forward(x, w, b, 1e-5, False, out)},
                        args.rounds, target=0.3)
        print(f"{'overhead LN (1,8) rows_forward':38s} cython {times['cython'] * 1e6:7.3f} us | "
              f"torch F.layer_norm {times['torch'] * 1e6:7.3f} us")
        x = randn((1, 16))
        x3 = x.reshape(1, 16, 1)
        p = [randn((1, 16)) for _ in range(3)]
        out3 = np.empty_like(x3)
        rm, rv = torch.zeros(16), torch.ones(16)
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(p[1][0]), torch.from_numpy(p[2][0])

        def theirs():
            with torch.inference_mode():
                F.batch_norm(tx, rm, rv, tw, tb, False, 0.1, 1e-5)
        times = measure({"torch": theirs,
                         "cython": lambda: be.channels_first_affine(x3, *p, out3)},
                        args.rounds, target=0.3)
        print(f"{'overhead BN eval (1,16) affine':38s} cython {times['cython'] * 1e6:7.3f} us | "
              f"torch F.batch_norm {times['torch'] * 1e6:7.3f} us")
    print(f"# loadavg at end {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
