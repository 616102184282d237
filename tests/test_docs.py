"""The documentation site: it builds, every page exists, images and internal links work.

Which build is checked: by default the test builds the site itself, with the
documented command's flags (``python -m sphinx -W --keep-going -b html docs <tmpdir>``),
so a warning fails the test and it works from a fresh clone. A caller that has just
built the site successfully with that command can skip the second build by pointing
``NORMKIT_DOCS_HTML`` at the output (e.g. ``NORMKIT_DOCS_HTML=docs/_build/html`` after
a passing ``python -m sphinx -W --keep-going -b html docs docs/_build/html``): an
existing directory alone is not trusted, since a failed ``--keep-going`` build still
writes its pages. The tests that need the built site are skipped when Sphinx, the theme or the math
renderer are not installed (``pip install -e ".[docs]"``); the others (README, LICENSE,
the runnable examples) always run.
"""
from __future__ import annotations

import html
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Pages this site must have (the optional ones only when their source exists).
REQUIRED_PAGES = [
    "index", "getting-started", "norms/index", "norms/batch_norm", "norms/layer_norm",
    "norms/group_norm", "norms/instance_norm", "norms/rms_norm", "choosing", "backends",
    "dtypes", "api", "changelog",
]
OPTIONAL_PAGES = ["diagnostics", "inference"]
FIGURES = ["accuracy_vs_batch.png", "speed.png", "stat_noise.png", "train_eval_gap.png"]
# pages whose ```python blocks are run by test_code_examples_run
EXAMPLE_PAGES = ["index", "getting-started", "norms/batch_norm", "norms/layer_norm",
                 "norms/group_norm", "norms/instance_norm", "norms/rms_norm", "backends",
                 "dtypes"]


def _sources():
    return sorted(p for p in DOCS.rglob("*.md") if p.name != "README.md"
                  and not {"_build", "tools", "_data"} & set(p.relative_to(DOCS).parts))


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory):
    for module in ("sphinx", "myst_parser", "pydata_sphinx_theme", "quickjax"):
        pytest.importorskip(module, reason=f"{module} is not installed: "
                            'pip install -e ".[docs]"')
    given = os.environ.get("NORMKIT_DOCS_HTML")
    if given:
        path = Path(given)
        path = path if path.is_absolute() else ROOT / path
        assert (path / "index.html").is_file(), f"NORMKIT_DOCS_HTML={given}: no index.html"
        return path
    out = tmp_path_factory.mktemp("docs_html")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"docs build failed:\n{proc.stdout}\n{proc.stderr}"
    return out


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.imgs, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img" and a.get("src"):
            self.imgs.append(a["src"])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _pages(html_dir):
    return sorted(p for p in html_dir.rglob("*.html")
                  if not {"_sources", "_static", "_modules"} & set(p.relative_to(html_dir).parts))


def _is_external(url):
    parts = urlsplit(url)
    return bool(parts.scheme or parts.netloc)


def test_every_page_built(html_dir):
    expected = REQUIRED_PAGES + [p for p in OPTIONAL_PAGES if (DOCS / f"{p}.md").is_file()]
    expected += [str(p.relative_to(DOCS).with_suffix("")) for p in _sources()]
    missing = [p for p in sorted(set(expected)) if not (html_dir / f"{p}.html").is_file()]
    assert not missing, f"pages not built: {missing}"
    for page in REQUIRED_PAGES:
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"


def test_images_exist_and_are_valid(html_dir):
    seen = set()
    for page in _pages(html_dir):
        for src in _parse(page).imgs:
            if _is_external(src) or src.startswith("data:"):
                continue
            target = (page.parent / unquote(urlsplit(src).path)).resolve()
            assert target.is_file(), f"{page.relative_to(html_dir)}: image {src} missing"
            data = target.read_bytes()
            assert data, f"{src} is empty"
            if target.suffix.lower() == ".png":
                assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{src} is not a PNG"
            elif target.suffix.lower() == ".svg":
                assert b"<svg" in data[:4096], f"{src} is not an SVG"
            else:
                pytest.fail(f"{src}: images must be PNG or SVG")
            seen.add(target.name)
    missing = [f for f in FIGURES if f not in seen]
    assert not missing, f"figures not shown on any page: {missing}"


def test_no_broken_internal_links(html_dir):
    ids_cache = {}
    broken = []
    for page in _pages(html_dir):
        for href in _parse(page).hrefs:
            if _is_external(href) or href.startswith(("mailto:", "javascript:")):
                continue
            parts = urlsplit(href)
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(html_dir)} -> {href}")
                continue
            if parts.fragment and target.suffix == ".html":
                if target not in ids_cache:
                    ids_cache[target] = _parse(target).ids
                if unquote(parts.fragment) not in ids_cache[target]:
                    broken.append(f"{page.relative_to(html_dir)} -> {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))


def test_substitutions_resolved(html_dir):
    """Numbers come from docs/_data: nothing may be left unreplaced."""
    for page in _pages(html_dir):
        text = page.read_text(encoding="utf-8")
        assert "{{" not in text.replace("{{ ", "{{"), f"{page}: unreplaced substitution"
        assert "PLACEHOLDER" not in text, f"{page}: placeholder left"


def test_api_reference_documents_every_public_name(html_dir):
    import importlib
    import types

    import normkit
    ids = _parse(html_dir / "api.html").ids
    documented = {i for i in ids if i.startswith("normkit.")}
    missing = []
    for name in normkit.__all__:
        obj = getattr(normkit, name)
        if isinstance(obj, types.ModuleType):
            for sub in getattr(obj, "__all__", []):
                alias = f"normkit.{sub}"
                if f"{obj.__name__}.{sub}" not in documented and alias not in documented:
                    missing.append(f"{obj.__name__}.{sub}")
            continue
        if f"normkit.{name}" in documented:
            continue
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("normkit") and f"{module}.{name}" in documented:
            continue
        if any(i.endswith("." + name) and importlib.util.find_spec(i.rsplit(".", 1)[0])
               for i in documented):
            continue
        missing.append(f"normkit.{name}")
    assert not missing, f"public names missing from docs/api.md: {missing}"


def _python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_code_examples_run(page):
    import normkit
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    blocks = _python_blocks(text)
    assert blocks, f"{page} has no python examples"
    if any("import torch" in b for b in blocks):
        pytest.importorskip("torch")
    backend, threads = normkit.get_backend(), normkit.get_num_threads()
    namespace = {"__name__": f"docs_example_{page.replace('/', '_')}"}
    cwd = os.getcwd()
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"docs/{page}.md[python block {i}]", "exec"), namespace)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"docs/{page}.md, python block {i} failed: {exc!r}\n"
                                     f"{block}") from exc
    finally:
        os.chdir(cwd)
        normkit.set_backend(backend)
        normkit.set_num_threads(threads)


def test_figure_script_fast(tmp_path):
    """``docs/tools/make_figures.py --fast`` runs end to end into a temporary directory."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, str(DOCS / "tools" / "make_figures.py"), "--fast", "--out",
         str(tmp_path), "--jobs", "1"], cwd=ROOT, capture_output=True, text=True,
        timeout=900, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("digits.json", "noise.json", "bench.json", "coldstart.json", "bench16.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the data files feed the prose: the substitutions must compute from them
    sys.path.insert(0, str(DOCS / "tools"))
    try:
        import docdata
        subs = docdata.substitutions(tmp_path)
    finally:
        sys.path.remove(str(DOCS / "tools"))
    assert "digits_acc_table" in subs and "bench_table" in subs
    # the 16-bit table of docs/dtypes.md: one row per 16-bit case of the run
    half = json.loads((tmp_path / "bench16.json").read_text())
    cases = [r["case"] for r in half["records"]]
    assert cases and all(c.endswith(("_f16", "_bf16")) for c in cases)
    assert all(f"`{c}`" in subs["dtypes_table"] for c in cases)
    assert "Measured with" in subs["dtypes_run"]


def test_dtypes_page_without_a_committed_run_says_how_to_make_one():
    """No numbers are invented: without docs/_data/bench16.json the page says so and
    gives the command that regenerates the table."""
    sys.path.insert(0, str(DOCS / "tools"))
    try:
        import docdata
        subs = docdata.half_subs(None)
    finally:
        sys.path.remove(str(DOCS / "tools"))
    assert subs["dtypes_table"] == ""
    assert "python -m normkit bench --cases 16bit" in subs["dtypes_run"]
    page = (DOCS / "dtypes.md").read_text(encoding="utf-8")
    assert "{{ dtypes_run }}" in page and "{{ dtypes_table }}" in page
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        assert f"| {dtype} |" in page


# ---------------------------------------------------------------- as a reader sees it
# Math is typeset at build time (docs/tools/svgmath.py): the pages must show formulas
# without a network and without raw TeX. The static checks read the HTML; the browser
# check lays the pages out in headless Chromium, as a reader's browser would.
MATH_PAGES = ["norms/batch_norm", "diagnostics"]
RAW_TEX = ("\\frac", "\\sigma", "\\sum", "\\hat", "$$")


def test_math_is_typeset_into_the_html(html_dir):
    for page in MATH_PAGES + ["norms/layer_norm", "choosing"]:
        path = html_dir / f"{page}.html"
        if not path.is_file():          # diagnostics is an optional page
            continue
        text = path.read_text(encoding="utf-8")
        n_math = len(re.findall(r'class="math svgmath"', text))
        assert n_math >= 5, f"{page}: {n_math} typeset formulas"
        assert text.count("<svg") >= n_math, f"{page}: a formula without its SVG"
        assert "math-error" not in text, f"{page}: a formula MathJax could not typeset"
        assert not re.search(r"<script[^>]*(mathjax|katex)", text, re.I), \
            f"{page}: loads a math script"
        # nothing outside the page: every script, stylesheet and image is local
        for url in re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="([^"]+)"', text):
            assert not _is_external(url), f"{page}: loads {url} from the network"


_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync"]

# Runs after the page has loaded; writes what the reader's browser laid out into the DOM.
_PROBE = """<script>
window.addEventListener('load', function () {
  function all(s) { return Array.prototype.slice.call(document.querySelectorAll(s)); }
  var r = {};
  r.math = all('.math').map(function (m) {
    var svg = m.querySelector('svg'), box = svg ? svg.getBoundingClientRect() : null;
    return box ? [box.width, box.height] : null; });
  r.text = document.body.innerText;
  r.tables = all('table').map(function (t) {
    var c = t.parentElement;
    return {scroll: t.scrollWidth, container: c.clientWidth,
            overflow: getComputedStyle(c).overflowX}; });
  r.resources = performance.getEntriesByType('resource').map(function (e) {
    return e.name; });
  var pre = document.createElement('pre');
  pre.id = 'normkit-probe';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _chromium():
    for name in (os.environ.get("NORMKIT_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


def _in_browser(html_dir, page, tmp_path, width=1400):
    """Load ``page`` in headless Chromium at ``width`` px; what the probe measured."""
    source = html_dir / f"{page}.html"
    # a copy in the same folder, so that relative links work; unique per process
    probe = source.with_name(f"_probe_{os.getpid()}_{source.name}")
    probe.write_text(source.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    try:
        proc = subprocess.run(
            [_chromium(), *_CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom",
             probe.as_uri()], capture_output=True, text=True, timeout=60)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="normkit-probe"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium did not run the page's scripts:\n{proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("page", MATH_PAGES)
def test_pages_as_a_reader_sees_them(html_dir, page, tmp_path):
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    if not (html_dir / f"{page}.html").is_file():
        pytest.skip(f"docs/{page}.md does not exist yet")
    seen = _in_browser(html_dir, page, tmp_path)
    assert len(seen["math"]) >= 5, f"{page}: only {len(seen['math'])} formulas"
    blank = [i for i, box in enumerate(seen["math"]) if not box or min(box) <= 0]
    assert not blank, (f"{page}: {len(blank)} of {len(seen['math'])} formulas show no "
                       f"typeset math (the first: {blank[:5]})")
    raw = [t for t in RAW_TEX if t in seen["text"]]
    assert not raw, f"{page}: raw TeX visible to the reader: {raw}"
    remote = [u for u in seen["resources"] if not u.startswith("file:")]
    assert not remote, f"{page}: the browser fetched {remote}"
    # at 1400 px every table fits its column, or its container scrolls sideways
    for i, t in enumerate(seen["tables"]):
        assert t["scroll"] <= t["container"] + 1 or t["overflow"] in ("auto", "scroll"), \
            f"{page}: table {i} is cut off: {t}"


NORM_PAGES = ["norms/batch_norm", "norms/layer_norm", "norms/group_norm",
              "norms/instance_norm", "norms/rms_norm"]


@pytest.mark.parametrize("page, width", [(p, 1400) for p in NORM_PAGES]
                         + [("norms/batch_norm", 1000)])
def test_norm_page_tables_fit(html_dir, page, width, tmp_path):
    """The framework-mapping tables fit the page whole at 1400 px (a laptop) and, with
    long code allowed to break, at 1000 px too: no column is hidden off to the right."""
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    seen = _in_browser(html_dir, page, tmp_path, width=width)
    assert seen["tables"], f"{page}: no tables"
    cut = [t for t in seen["tables"] if t["scroll"] > t["container"] + 1]
    assert not cut, f"{page}: tables wider than the page at {width} px: {cut}"


# ---------------------------------------------------------------- README and LICENSE
def test_license_is_shipped():
    import tomllib
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License") and "2026, normkit developers" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]     # what puts it into the wheel


def _readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", quick, re.S)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quick_start_is_two_self_contained_commands():
    """One line installs and runs the main job, one installs and runs the tests."""
    bench, tests = _readme_commands()
    assert bench.startswith("pip install") and bench.endswith("&& python -m normkit bench")
    assert tests.startswith("pip install") and tests.endswith("&& python -m pytest")
    extras = re.search(r'-e "\.\[([^\]]*)\]"', tests)
    assert extras and {"test", "peers"} <= set(extras.group(1).split(","))
    import tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras.group(1).split(",")) <= set(declared["optional-dependencies"])


def test_readme_layout_names_paths_that_exist():
    """The layout section stays true: every path it names exists (a planned one may be
    written ``x.pyx.tp``; then the rendered ``.pyx`` or the template must exist)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in re.findall(r"^((?:normkit|tests|benchmarks|docs)/\S*)", layout, re.M):
        candidates = [path, path.removesuffix(".tp")]
        if not any((ROOT / c).exists() for c in candidates):
            missing.append(path)
    assert not missing, f"README layout names missing paths: {missing}"


def test_backends_page_documents_every_simd_build():
    text = (DOCS / "backends.md").read_text(encoding="utf-8")
    for needle in ("AVX2", "AVX-512", "`_cython_kernels_avx2`", "`_cython_kernels_avx512`",
                   "NORMKIT_CYTHON_SIMD", "`baseline`", "`avx2`", "`avx512`", "`auto`"):
        assert needle in text, f"docs/backends.md does not mention {needle}"
    # the builds the page names are the ones this checkout built (where it built any)
    built = {p.name.split(".")[0] for p in (ROOT / "normkit" / "backends").glob(
        "_cython_kernels*.so")} | {p.name.split(".")[0] for p in (
        ROOT / "normkit" / "backends").glob("_cython_kernels*.pyd")}
    assert built <= {"_cython_kernels", "_cython_kernels_avx2", "_cython_kernels_avx512"}, \
        f"an extension build docs/backends.md does not describe: {sorted(built)}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_memory_tool_backs_the_backends_page():
    """docs/tools/memory.py runs, and the claims the backends page makes still hold:
    the compiled backends need only the output for float32, numpy needs several times
    the input. (Bounds, not the exact figures: those depend on NumPy's temporaries.)"""
    import normkit
    sys.path.insert(0, str(DOCS / "tools"))
    try:
        import memory
        backends = [b for b in ("cython", "numba", "numpy")
                    if b in normkit.available_backends()]
        results = memory.measure(backends)
    finally:
        sys.path.remove(str(DOCS / "tools"))
    assert "| `layer_norm (8, 128, 768)` | float32 |" in memory.markdown(results)
    for backend, cases in results.items():
        for key, r in cases.items():
            ratio = r["rss_bytes"] / r["input_bytes"]
            if key.endswith("float32") and backend != "numpy":
                assert 0.9 <= ratio <= 1.5, f"{backend} {key}: {ratio:.1f}x the input"
            if key.endswith("float32") and backend == "numpy":
                assert 2.0 <= ratio <= 8.0, f"numpy {key}: {ratio:.1f}x the input"
    assert "docs/tools/memory.py" in (DOCS / "backends.md").read_text(encoding="utf-8")


def test_contributing_and_pre_commit_name_the_gates():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert hooks["ruff"]["entry"] == "ruff check normkit"
    assert hooks["mypy"]["entry"] == "mypy normkit"
    assert hooks["mypy"].get("stages") is None                    # a gate on every commit
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "\nmypy normkit\n" in ci and "\nruff check normkit\n" in ci   # and in CI
    assert hooks["ruff-format"].get("stages") == ["manual"]       # optional, not a gate
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for command in ("ruff check normkit", "mypy normkit", "build_ext --inplace",
                    "--markdown --json RESULTS.json", "python -m pytest"):
        assert command in text, f"CONTRIBUTING.md does not show {command!r}"
    named = re.findall(r"`((?:normkit|tests|benchmarks|docs)/[\w./-]+)`", text)
    missing = [p for p in named if not any((ROOT / c).exists()
                                           for c in (p, p.removesuffix(".tp")))]
    assert not missing, f"CONTRIBUTING.md names missing paths: {missing}"


def test_bad_tex_is_a_build_error_not_a_red_box():
    pytest.importorskip("quickjax", reason='pip install -e ".[docs]"')
    sys.path.insert(0, str(DOCS / "tools"))
    try:
        import svgmath
    finally:
        sys.path.remove(str(DOCS / "tools"))
    svg = svgmath.tex_to_svg(r"\frac{a}{\sqrt{\sigma^2 + \varepsilon}}", True)
    assert svg.startswith("<svg") and "merror" not in svg
    assert not re.search(r'id="MJX-\d+-', svg)          # ids made unique per formula
    for bad, why in ((r"\frac{a", "Missing close brace"), (r"\nosuchmacro x", "nosuchmacro")):
        with pytest.raises(ValueError, match=why):
            svgmath.tex_to_svg(bad, True)
