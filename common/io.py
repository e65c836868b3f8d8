"""Atomic file output: every file the project writes appears whole or not at all.

A reader never sees a half-written CSV, JSON, PNG or checkpoint: content goes to a temporary file in
the destination's own directory (same filesystem), is flushed and fsynced, then ``os.replace``-d over
the destination. If anything raises before the replace, the temporary file is removed and the
destination is left as it was.

Temporaries carry the writing process's id (``.<name>.<pid>.*.tmp``, ``.staging-<pid>-*``), so a later
run removes those of a killed process (:func:`clean_stale_temporaries`) and never a live writer's.
A *report set* (:func:`write_report_set`) is staged whole, then moved in, and ``manifest.json`` (file
names and SHA-256) is written last: a reader trusts a folder whose manifest matches
(:func:`read_manifest`), so a kill during the move never passes a mix of old and new files as a report.
This is the one module of the project that renames files into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_bytes",
    "atomic_write_npz",
    "atomic_torch_save",
    "atomic_write_nifti",
    "staged_directory",
    "check_writable",
    "clean_stale_temporaries",
    "write_report_set",
    "read_manifest",
    "MANIFEST",
]

MANIFEST = "manifest.json"
_TEMPORARY = re.compile(r"^\.(?:.+\.(\d+)\..*\.tmp|staging-(\d+)-.*)$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_name: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit it replaces ``path`` atomically.

    Use it for writers that want a file name (``plt.savefig``, ``nib.save``, ``torch.save``)::

        with atomic_path("report/plot.png") as tmp:
            fig.savefig(tmp, format="png")

    ``keep_name=True`` yields ``path``'s own file name inside a private staging folder beside it, for
    writers that infer the format from the suffix (ITK's ``WriteImage`` on ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    if keep_name:
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=path.parent))
        tmp = staging / path.name
        tmp.touch()
    else:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Serialise ``obj`` first (so a non-serialisable value raises before anything is written)."""
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write_text(path, text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` (a PNG, a zip ...) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> Path:
    """``numpy.savez`` of ``arrays`` to ``path`` atomically (the exact name: no ``.npz`` is appended)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path` (a checkpoint is never left truncated)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, subdirs: tuple[str, ...] = ("imagesTr", "labelsTr")) -> Iterator[Path]:
    """Stage a dataset's files, then move them into ``out_dir`` only if every one was written.

    Yields a hidden staging folder inside ``out_dir`` (same filesystem, so the moves are renames). Write
    files into ``<staging>/<subdir>/``; on a clean exit each is ``os.replace``-d to ``out_dir/<subdir>/``.
    On any error the staging folder is removed, and so is ``out_dir`` if this call created it, so a
    failed preparation leaves nothing behind. Write the datalist after the block (atomically), last.
    """
    import shutil

    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=out_dir))
    try:
        yield staging
        for sub in subdirs:
            (out_dir / sub).mkdir(exist_ok=True)
            if (staging / sub).is_dir():
                for f in sorted((staging / sub).iterdir()):
                    os.replace(f, out_dir / sub / f.name)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_nifti(path: str | os.PathLike, data: Any, affine: Any) -> Path:
    """Gzipped NIfTI-1 written atomically and deterministically (gzip mtime 0: same data → same bytes).

    ``data`` any array (its dtype is kept), ``affine`` (4, 4) voxel → world in mm; qform and sform are
    both set to it (code 1, scanner). Serialised in memory (``img.to_bytes()``) because nibabel picks the
    format from the file name and :func:`atomic_path` names its temporary file ``.<name>.<random>.tmp``.
    """
    import gzip

    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files and staging folders) that a killed process left in ``folder``.

    Only names this module creates are touched, and only when the process id in the name is no longer
    running. Returns the removed paths; a warning names each.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or _pid_alive(int(match.group(1) or match.group(2))):
            continue
        warnings.warn(f"removing a stale temporary left by a killed run: {entry}", stacklevel=2)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable(folder: str | os.PathLike, min_free_bytes: int = 16 * 2**20) -> Path:
    """Check, before any expensive work, that ``folder`` can be created and written and has room.

    Creates ``folder`` if needed, writes and removes a probe file, removes stale temporaries
    (:func:`clean_stale_temporaries`) and checks ``shutil.disk_usage`` against ``min_free_bytes``.
    Raises ``OSError`` naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"output folder {folder} is not writable ({err.strerror or err})") from err
    clean_stale_temporaries(folder)
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise OSError(28, f"output folder {folder}: {free / 2**20:.1f} MiB free, need {min_free_bytes / 2**20:.1f} MiB")
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report_set(out_dir: str | os.PathLike, files: dict[str, Any], manifest: bool = False) -> dict[str, Path]:
    """Write a set of report files whole: stage every file, then move them in (then the manifest).

    Args:
        out_dir: destination folder (created if needed).
        files: file name -> content: ``str`` (UTF-8 text), ``bytes``, or a callable ``writer(path)`` that
            writes the file at ``path`` (``np.savez``, ``torch.save``, a renderer writing several files into
            ``path``'s folder and returning their names).

    Every file is written in a staging folder inside ``out_dir`` first; an error there (a full disk, a
    renderer's error) leaves ``out_dir`` as it was. Then each file is renamed into place. With
    ``manifest``, the old :data:`MANIFEST` is removed first and the new one (names and SHA-256) written
    last, atomically, so that :func:`read_manifest` detects a set mixed by a kill during the moves.
    Returns the paths of the written files (manifest excluded).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=out_dir))
    try:
        for name, content in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            elif isinstance(content, bytes):
                target.write_bytes(content)
            elif callable(content):
                content(target)
            else:
                raise ValueError(f"files: {name!r} must be text, bytes or a writer(path), got {type(content).__name__}")
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        for name in names:
            with open(staging / name, "rb+") as fh:
                os.fsync(fh.fileno())
        digests = {"files": {name: _sha256(staging / name) for name in names}}
        if manifest:
            (out_dir / MANIFEST).unlink(missing_ok=True)
        for name in names:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out_dir / name)
        if manifest:
            atomic_write_json(out_dir / MANIFEST, digests)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out_dir / name for name in names}


def read_manifest(out_dir: str | os.PathLike) -> dict[str, str]:
    """File name -> SHA-256 of a report set written by :func:`write_report_set`, checked against the files.

    Raises ``ValueError`` naming the folder when the manifest is missing or a file does not match it
    (a run killed while moving files in).
    """
    out_dir = Path(out_dir)
    try:
        files = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{out_dir}: no readable {MANIFEST}; the report set is incomplete") from err
    for name, digest in files.items():
        path = out_dir / name
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(f"{out_dir}: {name} does not match {MANIFEST}; the report set is incomplete")
    return dict(files)
