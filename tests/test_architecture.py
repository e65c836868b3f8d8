"""The import layering of docs/architecture.md, checked on the source with ``ast``, and a repository that
stands alone (no workspace paths or file-number citations, test-only tools outside ``common/``).

Every ``import`` counts, also those inside functions (a lazy import is still a dependency). A module
may import modules of its own layer or lower ones, never higher ones. A new module of ``common/`` must
be given a layer in :data:`LAYERS` (and in docs/architecture.md).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "common"

#: lowest first; a module belongs to the first entry whose name equals it or is its package prefix.
LAYERS: list[tuple[str, ...]] = [
    ("common.io", "common.errors"),
    ("common.validation",),
    ("common.distributed",),
    ("common.losses", "common.metrics", "common.stats", "common.checkpoint", "common.safe_load", "common.transforms",
     "common.data"),
    ("common.networks", "common.sliding_window", "common.c2f"),
    ("common.attacks", "common.certify", "common.denoise", "common.defenses", "common.handlers",
     "common.masking_diagnostics", "common.finetune", "common.ct_window", "common.progress"),
    ("common.evaluation.engine",),
    ("common.reporting", "common.report"),
    ("common.evaluation", "common.certification_report", "common.c2f_eval"),
    ("common.card",),
    ("common.studies",),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(COMMON.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module of ``common`` that ``name`` (a module or ``module.attribute``) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """Modules of ``common`` that the source of ``module`` imports anywhere (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "common" or name.startswith("common."):
                target = _resolve(name)
                if target not in (None, "common", module):
                    found.add(target)
    return found


def library_imports(module: str) -> set[str]:
    path = MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != "common" and layer_of(m) is None]
    assert not missing, f"give these modules a layer in LAYERS and docs/architecture.md: {missing}"


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m in MODULES if m != "common" and layer_of(m) is not None
        for t in sorted(library_imports(m)) if layer_of(t) is not None and layer_of(t) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module, allowed", [
    ("common.io", set()),
    ("common.validation", {"common.io"}),
    ("common.distributed", {"common.io", "common.validation"}),
])
def test_floor_modules_import_only_the_floor_below_them(module, allowed):
    """io < validation < distributed: the floor knows no domain class (no loss, metric, network, attack,
    handler, report)."""
    assert library_imports(module) <= allowed, library_imports(module) - allowed


def test_the_import_scanner_sees_lazy_and_relative_imports():
    """Oracle: a hand-written module with one import of each kind, read as ``common.defenses.advaug``."""
    source = (
        "import os\nfrom common.io import atomic_path\nfrom . import training\nfrom .. import metrics\n"
        "def f():\n    from common.networks.forwards import input_gradient\n    import common.handlers as h\n"
    )
    assert imports_in(source, "common.defenses.advaug") == {  # "from . import x" runs the package too
        "common.io", "common.defenses", "common.defenses.training", "common.metrics", "common.networks.forwards",
        "common.handlers",
    }
    assert imports_in("from . import advaug", "common.defenses", is_package=True) == {"common.defenses.advaug"}


# ----------------------------------------------------------------------------------- stands alone
TEXT_SUFFIXES = {".py", ".md", ".json", ".txt", ".toml", ".cfg", ".yml", ".yaml", ".sh", ".conf", ".html", ""}
SKIPPED_DIRS = {".git", "__pycache__", "demo", "data", "eval", "models", "runs", "demo_output"}
#: a workspace path, a seed file name (three digits, "_", 16 hex digits) or a citation by seed number
FORBIDDEN = re.compile(
    r"\.\./" + "shared" + r"|/work/" + "shared" + r"|\b\d{3}_[0-9a-f]{16}\b|\bseed(?: paper)?[ _-]?00[0-9]\b",
    re.IGNORECASE,
)


def _repository_text_files():
    yield from (p for p in ROOT.glob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    for top in ("common", "scripts", "bundles", "docs", "tests", ".ci"):
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT).parts
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIPPED_DIRS.intersection(rel[:-1]):
                yield path


def test_no_file_cites_a_workspace_path_or_a_seed_file():
    hits = []
    for path in _repository_text_files():
        if path == Path(__file__).resolve():  # the pattern's own examples
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not hits, "cite papers by authors, year and venue (docs/references.md):\n" + "\n".join(hits)


def test_forbidden_pattern_oracle():
    for bad in ("see ../" + "shared/DESIGN.md", "Seed " + "002's aggregation", "seed paper " + "003", "001_" + "aae94ad858b81a9b.txt"):
        assert FORBIDDEN.search(bad), bad
    for good in ("--seed 0", "seed=7", "Li et al., 2019", "seed 0. IoU", "shared library"):
        assert not FORBIDDEN.search(good), good


def test_test_only_tools_live_under_tests():
    assert not list(COMMON.rglob("browser_check.py"))
    assert (ROOT / "tests" / "helpers" / "browser_check.py").is_file()


def test_architecture_page_names_every_layer():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [p for prefixes in LAYERS for p in prefixes if f"`{p.removeprefix('common.')}" not in page]
    assert not missing, f"docs/architecture.md does not name {missing}"


def _replacing_calls(source: str) -> list[str]:
    """Calls that move a file over another: ``os.replace`` / ``os.rename`` / ``shutil.move`` and
    ``<path>.replace(<one argument>)`` / ``<path>.rename(...)`` (``str.replace`` takes two arguments)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else ""
        if (owner_name, name) in {("os", "replace"), ("os", "rename"), ("shutil", "move")}:
            found.append(f"{owner_name}.{name}")
        elif name in {"replace", "rename"} and owner_name not in {"os", "shutil"} and len(node.args) == 1:
            found.append(f".{name}")
    return found


def test_only_common_io_replaces_files():
    assert _replacing_calls("import os\nos.replace(a, b)\np.rename(q)\ns.replace('a', 'b')\n") == ["os.replace", ".rename"]
    offenders = {
        str(path.relative_to(ROOT)): calls
        for path in COMMON.rglob("*.py")
        if path != COMMON / "io.py" and (calls := _replacing_calls(path.read_text()))
    }
    assert offenders == {}, f"atomic replaces belong in common/io.py: {offenders}"
