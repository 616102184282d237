"""Build script for normkit's compiled Cython backend (``normkit.backends._cython_kernels``).

Metadata lives in pyproject.toml; this file only adds the extension.

* The extension is written as a Tempita template, ``_cython_kernels.pyx.tp`` (as
  scikit-learn's ``sklearn/_loss/_loss.pyx.tp``), with parts ``_kernels_*.pxi.tp``
  and C helpers in ``nk_helpers.h``. It is rendered and cythonized at build time into
  the build directory, so no generated .pyx or C lands in the source tree or the
  sdist; the template, its parts and the header are listed as the extension's
  ``depends`` (a change rebuilds it, and the sdist carries them).
* OpenMP is detected the way scikit-learn does it (sklearn/_build_utils/
  openmp_helpers.py): compile, link and run a tiny OpenMP program with the compiler
  that will build the extension. If that works the extension is built with the
  OpenMP flag, otherwise (or with ``NORMKIT_NO_OPENMP=1``) serially.
* Flags are portable by default (``-O3``); ``NORMKIT_NATIVE=1`` adds
  ``-march=native`` (the binary then only runs on CPUs like the build machine).
  Never -ffast-math: NaN/Inf must propagate; reductions vectorize through explicit
  independent accumulators instead.
* On x86 (not Windows) the same template is also built with AVX2 and with AVX-512 flags
  (``_cython_kernels_avx2``, ``_cython_kernels_avx512``); cython_backend.py loads the
  best one the CPU runs, so the install stays portable. ``NORMKIT_NO_SIMD_VARIANTS=1``
  skips them; ``NORMKIT_NATIVE=1`` makes them moot and skips them too.
* What was built (OpenMP or not and why, flags, compiler) is written to a generated
  header, normkit_build_config.h, that the extension compiles in and reports through
  ``normkit.backends.cython_backend.info()``.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXT_NAME = "normkit.backends._cython_kernels"
# extra builds of the same .pyx, loaded only on CPUs that have these instructions
# (nk_cpu_level() in the .pyx checks exactly these features)
# (F16C: float16 <-> float32 in hardware; every AVX2 CPU but very few has it, every
# AVX-512 one does. No -mfma: results would depend on the build.)
SIMD_VARIANTS = {
    "avx2": ["-mavx2", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mf16c"],
}
HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = os.path.join("normkit", "backends")
TEMPLATE = os.path.join(BACKENDS, "_cython_kernels.pyx.tp")
# the template's parts and the C header: rendered or included into every build
DEPENDS = [os.path.join(BACKENDS, name) for name in (
    "_kernels_shared.pxi.tp", "_kernels_stats.pxi.tp", "_kernels_elementwise.pxi.tp",
    "_kernels_api.pxi.tp", "nk_helpers.h", "nk_half.h")]

OPENMP_TEST = textwrap.dedent("""\
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d %d\\n", n, omp_get_max_threads());
        return n >= 1 ? 0 : 1;
    }
    """)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _openmp_flags(compiler):
    """(compile flags, link flags) candidates for this compiler, most common first."""
    if compiler.compiler_type == "msvc":
        return [(["/openmp"], [])]
    if sys.platform == "darwin":
        # Apple clang needs libomp (e.g. from Homebrew), gcc takes -fopenmp
        return [(["-fopenmp"], ["-fopenmp"]),
                (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    return [(["-fopenmp"], ["-fopenmp"])]


def check_openmp(compiler, build_temp):
    """Compile, link and run a small OpenMP program: (cflags, ldflags, note)."""
    if _env_flag("NORMKIT_NO_OPENMP"):
        return [], [], "disabled by NORMKIT_NO_OPENMP"
    os.makedirs(build_temp, exist_ok=True)
    errors = []
    for cflags, ldflags in _openmp_flags(compiler):
        tmp = tempfile.mkdtemp(dir=build_temp)
        try:
            src = os.path.join(tmp, "test_openmp.c")
            with open(src, "w") as f:
                f.write(OPENMP_TEST)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            exe = "test_openmp"
            compiler.link_executable(objs, exe, output_dir=tmp, extra_postargs=ldflags)
            exe_path = os.path.join(tmp, compiler.executable_filename(exe))
            out = subprocess.run([exe_path], capture_output=True, text=True, timeout=60)
            if out.returncode != 0 or not out.stdout.strip():
                raise RuntimeError(f"test program failed: {out.returncode} {out.stderr.strip()}")
            return cflags, ldflags, f"compile-and-link test passed with {' '.join(cflags)}"
        except Exception as exc:  # noqa: BLE001 - any failure means: no OpenMP
            errors.append(f"{' '.join(cflags)}: {type(exc).__name__}: {exc}".strip())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [], [], "compile-and-link test failed (" + "; ".join(errors)[:400] + ")"


def _x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


class BuildExt(build_ext):
    """build_ext that cythonizes, detects OpenMP and records the build configuration.

    On x86 the kernels are also built with AVX2 and with AVX-512 flags (modules
    _cython_kernels_avx2 / _avx512, each rendered from the template under its name);
    cython_backend.py imports the best one the CPU runs. The float32 statistics are
    accumulated in double, so they are compute-bound at SSE2's two doubles per
    instruction: one thread, 4096 x 768 LayerNorm took 1.80 ms (SSE2), 1.43 (AVX2),
    1.0 (AVX-512); plane_moments 2.5 / 1.4 / 0.9 ms.
    """

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:          # the builds compile side by side
            self.parallel = min(2, os.cpu_count() or 1)

    def _render(self, ext):
        """Render the template into build_temp as <module name>.pyx (each SIMD variant
        needs its own module name); rewrite it only when the text changed."""
        from Cython import Tempita

        src_dir = os.path.join(self.build_temp, "tempita", *ext.name.split(".")[:-1])
        os.makedirs(src_dir, exist_ok=True)
        pyx = os.path.join(src_dir, ext.name.split(".")[-1] + ".pyx")
        with open(os.path.join(HERE, TEMPLATE)) as f:
            template = Tempita.Template(f.read(), name=TEMPLATE)
        text = template.substitute(TEMPLATE_DIR=os.path.join(HERE, BACKENDS))
        if not os.path.exists(pyx) or open(pyx).read() != text:
            with open(pyx, "w") as f:
                f.write(text)
        return pyx

    def run(self):
        from Cython.Build import cythonize

        for ext in self.extensions:
            ext.sources = [self._render(ext)]
        cythonized = cythonize(
            self.extensions,
            build_dir=os.path.join(self.build_temp, "cython"),
            compiler_directives={"language_level": 3},
            quiet=True,
        )
        for ext, done in zip(self.extensions, cythonized, strict=True):   # keep setuptools' objects
            ext.sources = done.sources
        super().run()

    def _compiles_with(self, flags):
        tmp = tempfile.mkdtemp(dir=self.build_temp)
        try:
            src = os.path.join(tmp, "flagtest.c")
            with open(src, "w") as f:
                f.write("int f(const float *p) { float s = 0; for (int i = 0; i < 64; i++) "
                        "s += p[i]; return (int)s; }\n")
            self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def build_extensions(self):
        import Cython
        import numpy

        os.makedirs(self.build_temp, exist_ok=True)
        msvc = self.compiler.compiler_type == "msvc"
        omp_cflags, omp_ldflags, note = check_openmp(self.compiler, self.build_temp)
        if omp_cflags:
            print(f"normkit: building the Cython backend with OpenMP ({note})")
        else:
            print(f"normkit: building the Cython backend WITHOUT OpenMP: {note}")
        base = ["/O2"] if msvc else ["-O3"]
        if _env_flag("NORMKIT_NATIVE") and not msvc:
            base.append("-march=native")
        compiler = (self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None)
                    else self.compiler.compiler_type)

        keep = []
        for ext in self.extensions:
            variant = getattr(ext, "normkit_variant", None)
            cflags = base + SIMD_VARIANTS.get(variant, []) + omp_cflags
            if variant and not self._compiles_with(cflags):
                print(f"normkit: skipping the {variant} build: the compiler rejects {cflags}")
                continue
            config_dir = os.path.join(self.build_temp, "normkit_config", ext.name)
            os.makedirs(config_dir, exist_ok=True)
            header = os.path.join(config_dir, "normkit_build_config.h")
            values = {
                "NORMKIT_BUILD_CFLAGS": " ".join(cflags),
                "NORMKIT_BUILD_LDFLAGS": " ".join(omp_ldflags),
                "NORMKIT_BUILD_OPENMP_NOTE": note,
                "NORMKIT_BUILD_COMPILER": compiler,
                "NORMKIT_BUILD_CYTHON": Cython.__version__,
            }
            text = "/* generated by normkit's setup.py */\n" + "".join(
                f"#define {k} {json.dumps(v)}\n" for k, v in values.items())
            old = open(header).read() if os.path.exists(header) else None
            if old != text:      # rewrite only on change: a change forces a rebuild
                with open(header, "w") as f:
                    f.write(text)
            ext.include_dirs += [config_dir, os.path.join(HERE, BACKENDS), numpy.get_include()]
            ext.define_macros += [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
            ext.extra_compile_args += cflags
            ext.extra_link_args += omp_ldflags
            ext.depends = list(ext.depends) + [header]
            keep.append(ext)
        self.extensions[:] = keep
        super().build_extensions()


def _extensions():
    exts = [Extension(EXT_NAME, [TEMPLATE], depends=list(DEPENDS))]
    if (_x86() and sys.platform != "win32" and not _env_flag("NORMKIT_NATIVE")
            and not _env_flag("NORMKIT_NO_SIMD_VARIANTS")):
        for variant in SIMD_VARIANTS:
            ext = Extension(f"{EXT_NAME}_{variant}", [TEMPLATE], depends=list(DEPENDS))
            ext.normkit_variant = variant
            exts.append(ext)
    return exts


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
