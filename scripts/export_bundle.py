"""Export one bundle as a self-contained model-zoo zip: ``python -m scripts.export_bundle NAME --output_dir DIR``.

The zip holds ``NAME/`` with the bundle's ``configs/``, ``docs/``, ``LICENSE`` and ``large_files.yml``, plus
the part of the shared library its configs need, vendored as ``NAME/scripts/common/`` (the model zoo's
convention: a bundle's own code lives in its ``scripts`` package). Which modules are needed is the import
closure of every ``common.*`` name the configs mention (``$import``, ``_target_``, expressions), followed
through the modules' own ``import`` statements with :mod:`ast` (no module is executed). The configs' and
the vendored modules' references ``common.`` become ``scripts.common.``, so the bundle runs from its own
root with nothing but its installed dependencies::

    cd NAME && python -m monai.bundle run --config_file "['configs/train.json','configs/demo.json']"

``--include_weights`` packages the weights that the bundle's ``large_files.yml`` lists (``models/model.pt``;
``models/coarse/model.pt`` and ``models/fine/model.pt`` for the two-model C2F bundle), each re-saved in the
``{"model": CPU state dict}`` layout that ``CheckpointLoader``, ``ckpt_export`` and MONAI Deploy read, and
writes the SHA-256 of exactly those bytes into the zip's ``large_files.yml``. The sources default to the same
paths under ``bundles/NAME``; ``--weights PATH`` names the source of a single entry, ``--weights
"{'models/coarse/model.pt': PATH, ...}"`` one per entry.
``docs/export_info.json`` records the source commit and the vendored modules. Demo data, runs, evaluation
outputs and ``models/`` are never copied (only the listed weights, when asked). The zip is written
atomically and byte-for-byte reproducibly (fixed entry timestamps).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import fire

from common.io import atomic_path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
LIBRARY = "common"
VENDOR_PACKAGE = "scripts"
COPIED = ("configs", "docs", "LICENSE", "large_files.yml")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_NAME_REF = re.compile(rf"(?<![\w.]){LIBRARY}(?:\.[A-Za-z_]\w*)+")
_BARE_IMPORT = re.compile(rf"^\$\s*import\s+{LIBRARY}\s*$")
_CONFIG_REF = re.compile(rf"(?<![\w.]){LIBRARY}(?=\.[A-Za-z_])")

__all__ = ["export_bundle", "config_references", "import_closure", "rewrite_config", "rewrite_module_source", "main"]


def _strings(obj: Any):
    """Every string value in a parsed JSON config (dict values, list items), depth first."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of dotted module ``name`` under ``root`` (``a/b.py`` or ``a/b/__init__.py``)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _longest_module(dotted: str, root: Path) -> str | None:
    """The longest prefix of ``dotted`` (``common.a.B.c``) that is a module under ``root``."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if _module_file(name, root) is not None:
            return name
    return None


def config_references(configs: dict[str, Any], root: Path = REPO) -> set[str]:
    """The library modules that the configs (file name → parsed JSON) name, e.g. ``{"common.attacks"}``."""
    found = set()
    for config in configs.values():
        for text in _strings(config):
            if _BARE_IMPORT.match(text):
                found.add(LIBRARY)
            for match in _NAME_REF.findall(text):
                module = _longest_module(match, root)
                if module is not None:
                    found.add(module)
    return found


def _imports_of(name: str, root: Path) -> set[str]:
    """Library modules imported anywhere in module ``name`` (top level or inside functions)."""
    path = _module_file(name, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate == LIBRARY or candidate.startswith(LIBRARY + "."):
                module = _longest_module(candidate, root)
                if module is not None:
                    found.add(module)
    return found


def import_closure(modules: set[str], root: Path = REPO) -> set[str]:
    """``modules`` plus their parent packages and everything they import from the library, transitively."""
    todo, done = list(modules), set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run on import
        todo.extend(_imports_of(name, root) - done)
    return done


def rewrite_module_source(source: str, filename: str = "<module>") -> str:
    """Point a library module's absolute imports at the vendored copy: ``from common.x import y`` →
    ``from scripts.common.x import y``; ``import common.x as y`` → ``import scripts.common.x as y``.

    A plain ``import common.x`` (no alias) would bind the name ``common``, which the vendored copy
    cannot provide, so it raises ``ValueError`` naming the file and line instead of exporting broken code.
    """
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
            node.module == LIBRARY or node.module.startswith(LIBRARY + ".")
        ):
            i = node.lineno - 1
            lines[i] = re.sub(rf"\bfrom\s+{LIBRARY}\b", f"from {VENDOR_PACKAGE}.{LIBRARY}", lines[i], count=1)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == LIBRARY or alias.name.startswith(LIBRARY + "."):
                    if alias.asname is None:
                        raise ValueError(f"{filename}:{node.lineno}: 'import {alias.name}' cannot be vendored; "
                                         f"use 'from ... import ...' or an alias")
                    i = node.lineno - 1
                    lines[i] = re.sub(rf"(?<![\w.]){re.escape(alias.name)}\b",
                                      f"{VENDOR_PACKAGE}.{alias.name}", lines[i], count=1)
    return "".join(lines)


def rewrite_config(obj: Any) -> Any:
    """A config with every ``common.`` reference pointing at ``scripts.common.``.

    ``$import common`` becomes ``$import scripts.common``, and ``$import scripts`` is put first in every
    ``imports`` list that needs it, because MONAI binds ``$import a.b`` under the key ``"a.b"`` and the
    expressions ``$scripts.common...`` need the name ``scripts``.
    """
    if isinstance(obj, str):
        if _BARE_IMPORT.match(obj):
            return f"$import {VENDOR_PACKAGE}.{LIBRARY}"
        return _CONFIG_REF.sub(f"{VENDOR_PACKAGE}.{LIBRARY}", obj)
    if isinstance(obj, list):
        return [rewrite_config(v) for v in obj]
    if isinstance(obj, dict):
        out = {k: rewrite_config(v) for k, v in obj.items()}
        imports = out.get("imports")
        anchor = f"$import {VENDOR_PACKAGE}"
        if isinstance(imports, list) and anchor not in imports and any(
            isinstance(s, str) and f"{VENDOR_PACKAGE}.{LIBRARY}" in s for s in imports
        ):
            out["imports"] = [anchor, *imports]
        return out
    return obj


def _source_commit(root: Path) -> dict:
    """``{"commit": sha or None, "modified": bool or None}`` of the repository at ``root`` (read-only git)."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "common", "bundles"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        return {"commit": sha, "modified": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}


def _normalised_weights(path: Path) -> bytes:
    """The checkpoint at ``path`` (``{"model": sd, ...}`` or a bare state dict) re-serialised as
    ``{"model": CPU state dict}``; raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"weights {path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path}: expected a state dict or a dict with key 'model'")
    buffer = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu().contiguous() for k, v in state.items()}}, buffer)
    return buffer.getvalue()


def _large_files_paths(text: str) -> list[str]:
    """The ``path`` of every entry of a ``large_files.yml`` (the flat zoo format: ``- path: "..."`` lines)."""
    return [line.split(":", 1)[1].strip().strip("\"'") for line in text.splitlines() if line.strip().startswith("- path:")]


def _large_files_yml(text: str, digests: dict[str, str]) -> str:
    """``large_files.yml`` with each packaged entry's ``hash_val`` set to its SHA-256 in ``digests`` (path →
    hex digest), and the template's comments replaced by one line saying where the hashes come from."""
    out, current, filled = ["# hash_val: SHA-256 of each file exactly as packaged by scripts/export_bundle.py."], None, set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):  # the repository copy's comments describe the unfilled template
            continue
        if stripped.startswith("- path:"):
            current = stripped.split(":", 1)[1].strip().strip("\"'")
        if current in digests and stripped.startswith("hash_val:"):
            line = line[: line.index("hash_val:")] + f'hash_val: "{digests[current]}"'
            filled.add(current)
        out.append(line)
    if filled != set(digests):
        raise ValueError(f"large_files.yml: no 'hash_val' field to fill for {sorted(set(digests) - filled)}")
    return "\n".join(out) + "\n"


def _weight_sources(bundle: Path, entries: list[str], weights) -> dict[str, Path]:
    """Source checkpoint of every ``large_files.yml`` entry: ``weights`` as a path (one entry only) or a
    mapping entry → path, else the entry's own path under ``bundle``."""
    if not entries:
        raise ValueError(f"{bundle / 'large_files.yml'}: lists no files to package")
    if weights is None:
        return {e: bundle / e for e in entries}
    if isinstance(weights, dict):
        if set(weights) != set(entries):
            raise ValueError(f"weights: expected one source for each of {entries}, got {sorted(weights)}")
        return {e: Path(weights[e]) for e in entries}
    if len(entries) != 1:
        raise ValueError(f"weights: {len(entries)} files to package ({entries}); pass a mapping entry -> path")
    return {entries[0]: Path(weights)}


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _serve_packaged_weights(inference: bytes, sources: dict[str, Path]) -> bytes:
    """The exported ``inference.json`` pointed at the one packaged ``models/model.pt``.

    In the repository a bundle keeps one folder per variant (``models/<variant>/model.pt``); a released
    bundle serves one model from ``models/model.pt``, the only place MONAI Label and Deploy's directory
    mode look. Bundles packaging several files (``resdsn_c2f_pancreas``: coarse and fine) already read
    them where they are packaged, and are left alone.
    """
    config = json.loads(inference)
    if set(sources) != {"models/model.pt"} or "ckpt_dir" not in config:
        return inference
    config["ckpt_dir"] = "$@bundle_root + '/models'"
    return (json.dumps(config, indent=4, ensure_ascii=False) + "\n").encode("utf-8")


def export_bundle(name: str, output_dir: str | Path, include_weights: bool = False,
                  weights: str | Path | dict[str, str] | None = None,
                  bundles_dir: Path = BUNDLES, root: Path = REPO) -> Path:
    """Write ``<output_dir>/<name>.zip`` (see the module docstring) and return its path.

    Raises ``ValueError`` for an unknown bundle, weights that do not match ``large_files.yml`` or a
    checkpoint that is not a state dict, and ``FileNotFoundError`` for a missing checkpoint.
    """
    bundle = Path(bundles_dir) / str(name)
    if not isinstance(name, str) or not name or "/" in name or not (bundle / "configs" / "metadata.json").is_file():
        known = sorted(p.name for p in Path(bundles_dir).iterdir() if (p / "configs" / "metadata.json").is_file())
        raise ValueError(f"name: no bundle {name!r} in {bundles_dir} (known: {known})")
    if weights is not None and not include_weights:
        raise ValueError("weights: given without --include_weights")
    configs = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted((bundle / "configs").glob("*.json"))}
    modules = sorted(import_closure(config_references(configs, root), root))

    files: dict[str, bytes] = {}
    for entry in COPIED:
        src = bundle / entry
        paths = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src] if src.is_file() else []
        for path in paths:
            rel = path.relative_to(bundle).as_posix()
            if "__pycache__" in rel:
                continue
            data = path.read_bytes()
            if rel.startswith("configs/") and path.suffix == ".json":
                data = (json.dumps(rewrite_config(json.loads(data)), indent=4, ensure_ascii=False) + "\n").encode("utf-8")
            files[rel] = data
    files[f"{VENDOR_PACKAGE}/__init__.py"] = b'"""The bundle\'s own code (model-zoo layout): the vendored shared library."""\n'
    for module in modules:
        path = _module_file(module, root)
        rel = path.relative_to(root).as_posix()
        files[f"{VENDOR_PACKAGE}/{rel}"] = rewrite_module_source(path.read_text(encoding="utf-8"), rel).encode("utf-8")
    if include_weights:
        if "large_files.yml" not in files:
            raise FileNotFoundError(f"{bundle / 'large_files.yml'}: needed to list the weights and their sha256")
        template = files["large_files.yml"].decode("utf-8")
        sources = _weight_sources(bundle, _large_files_paths(template), weights)
        for entry, source in sources.items():
            files[entry] = _normalised_weights(source)
        digests = {entry: hashlib.sha256(files[entry]).hexdigest() for entry in sources}
        files["large_files.yml"] = _large_files_yml(template, digests).encode("utf-8")
        files["configs/inference.json"] = _serve_packaged_weights(files["configs/inference.json"], sources)
    info = {"bundle": name, "source_repository": "robust-seg-monai", **_source_commit(root),
            "vendored_modules": modules, "weights_included": bool(include_weights)}
    files["docs/export_info.json"] = (json.dumps(info, indent=2) + "\n").encode("utf-8")

    target = Path(output_dir) / f"{name}.zip"
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for rel in sorted(files):
                _add(archive, f"{name}/{rel}", files[rel])
    return target


def main(name: str, output_dir: str = ".", include_weights: bool = False, weights: str | dict | None = None) -> str:
    """CLI: ``python -m scripts.export_bundle NAME --output_dir DIR [--include_weights] [--weights PATH or
    "{'models/...pt': PATH, ...}"]``; prints the zip's path."""
    return str(export_bundle(name, output_dir, include_weights=include_weights, weights=weights))


if __name__ == "__main__":
    from scripts.cli import run

    run(main)
