"""Atomic file output: every file the project writes appears whole or not at all.

A reader never sees a half-written CSV, JSON, PNG or checkpoint: content goes to a temporary file in
the destination's own directory (same filesystem), is flushed and fsynced, then ``os.replace``-d over
the destination. If anything raises before the replace, the temporary file is removed and the
destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "staged_directory"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit it replaces ``path`` atomically.

    Use it for writers that want a file name (``plt.savefig``, ``nib.save``, ``torch.save``)::

        with atomic_path("report/plot.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Serialise ``obj`` first (so a non-serialisable value raises before anything is written)."""
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write_text(path, text)


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
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
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


__all__ += ["atomic_write_nifti"]


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
