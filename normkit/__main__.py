"""Command line: ``python -m normkit info`` and ``python -m normkit bench``."""
from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import numpy as np

    import normkit
    from normkit.backends import backend_status, resolve

    print(f"normkit {normkit.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}), numpy {np.__version__}")
    print(f"default backend: {normkit.get_backend()}", end="")
    try:
        print(f" -> {resolve().NAME}")
    except Exception as exc:  # noqa: BLE001
        print(f" (cannot load: {exc})")
    print(f"threads: {normkit.get_num_threads()}")
    print("backends:")
    for name, status in backend_status().items():
        if status == "available":
            details = ", ".join(f"{k}={v}" for k, v in resolve(name).info().items())
            print(f"  {name:7s} available  ({details})")
        else:
            print(f"  {name:7s} NOT available: {status}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="normkit", description="normkit's command line: what works on this machine "
        "(info) and the benchmark (bench).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends available here, default backend, threads")
    from . import _bench  # NumPy + normkit only; torch/onnxruntime load inside `bench`
    _bench.add_arguments(sub.add_parser(
        "bench", help="time every backend against the copy floor, PyTorch and ONNX Runtime",
        description=_bench.DESCRIPTION))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    return {"info": _info, "bench": _bench.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
