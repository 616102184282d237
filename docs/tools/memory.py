"""Peak extra memory of one normkit call, per backend and dtype (the numbers in backends.md).

    python docs/tools/memory.py            # Markdown table on stdout (~30 s)

"Extra" is what the call needs beyond its input: the peak resident memory during the
call minus the resident memory just before it, so the output array counts (1x the
input for these calls). Measured on Linux in one fresh process per backend:

* glibc is told to serve every allocation of 64 KiB or more with its own mmap and to
  return it on free (``MALLOC_MMAP_THRESHOLD_``), so that freed memory from an earlier
  call cannot hide a later call's need; kernel threads and Numba's allocations are
  counted alike, since RSS sees every allocator;
* the peak is reset right before the call (``/proc/self/clear_refs``, value 5) and read
  after it (``VmHWM`` in ``/proc/self/status``);
* each case is called once on a small input first (JIT compilation, thread pools), then
  measured three times; the median is reported.

The numpy backend's figure is checked against ``tracemalloc`` (which traces NumPy's own
allocations, all that backend makes) and both are printed.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CASES = {
    "layer_norm (8, 128, 768)": ("ln", (8, 128, 768)),
    "batch_norm training (8, 64, 56, 56)": ("bn_train", (8, 64, 56, 56)),
}
DTYPES = ("float32", "float16")


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _call(nk, kind, x, backend):
    import numpy as np
    if kind == "ln":
        return nk.layer_norm(x, x.shape[-1:], backend=backend)
    # running statistics in float32 for float16 data (as a float16 model keeps them)
    stats_dtype = np.float32 if x.dtype == np.float16 else x.dtype
    rm, rv = np.zeros(x.shape[1], stats_dtype), np.ones(x.shape[1], stats_dtype)
    return nk.batch_norm(x, rm, rv, training=True, backend=backend)


def _measure_in_this_process(backend):
    import tracemalloc

    import numpy as np

    import normkit as nk
    rng = np.random.default_rng(0)
    out = {}
    for label, (kind, shape) in CASES.items():
        for dtype in DTYPES:
            small = rng.standard_normal((2,) + shape[1:]).astype(dtype)
            _call(nk, kind, small, backend)                        # compile / warm up
            x = rng.standard_normal(shape).astype(dtype)
            rss = []
            for _ in range(3):
                before = _rss_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                                   # reset VmHWM
                y = _call(nk, kind, x, backend)
                rss.append(_rss_kib("VmHWM") - before)
                del y
            tracemalloc.start()
            y = _call(nk, kind, x, backend)
            traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            del y
            out[f"{label}|{dtype}"] = {"input_bytes": x.nbytes,
                                       "rss_bytes": statistics.median(rss) * 1024,
                                       "traced_bytes": traced}
    return out


def measure(backends=None):
    """{backend: {case|dtype: {...}}}, each backend in a fresh process."""
    import normkit
    results = {}
    for backend in backends or normkit.available_backends():
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        proc = subprocess.run([sys.executable, __file__, "--child", backend], env=env,
                              capture_output=True, text=True, check=True)
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def markdown(results):
    backends = list(results)
    lines = ["| call | dtype | " + " | ".join(f"`{b}`" for b in backends) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in backends) + " |"]
    for label in CASES:
        for dtype in DTYPES:
            cells = []
            for b in backends:
                r = results[b][f"{label}|{dtype}"]
                cell = f"{r['rss_bytes'] / r['input_bytes']:.1f}x"
                if b == "numpy":
                    cell += f" ({r['traced_bytes'] / r['input_bytes']:.1f}x traced)"
                cells.append(cell)
            lines.append(f"| `{label}` | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_measure_in_this_process(sys.argv[2])))
    else:
        print(markdown(measure(sys.argv[1:] or None)))
