"""Create (or reuse) the MONAI Label virtualenv from the pinned ``requirements-label.txt``.

    python -m scripts.monai_label_env                      # -> <repo>/.venv-label/bin/python

MONAI Label cannot share the main venv (its import chain needs a torchvision that imports beside
torch; see the comments in ``requirements-label.txt``), so it lives in its own venv. Every package
is pinned with ``==`` and installed with ``pip install --no-deps``: nothing is resolved, and the
result is the same on every machine. The project itself is not installed there; callers put the
repository on ``PYTHONPATH`` (as ``tests/bundle_run.py`` does for bundle runs).

Idempotent: after a successful install the venv holds a stamp file with the SHA-256 of the
requirements file; a venv whose stamp matches is reused as it is, any other (missing, partial,
stale) is deleted and built again. A lock file in the temporary directory (named by the venv's path,
so the repository gets no stray file) serialises concurrent callers.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-label"
DEFAULT_REQUIREMENTS = REPO / "requirements-label.txt"
STAMP_NAME = ".requirements.sha256"
LAYER_PTH = "_base_layer.pth"

__all__ = [
    "DEFAULT_VENV", "DEFAULT_REQUIREMENTS", "requirements_hash", "stamp_value", "venv_python", "is_current",
    "ensure_env", "main",
]


def requirements_hash(requirements: str | os.PathLike = DEFAULT_REQUIREMENTS) -> str:
    """SHA-256 (hex) of the requirements file's bytes; ``FileNotFoundError`` naming it if missing."""
    path = Path(requirements)
    if not path.is_file():
        raise FileNotFoundError(f"requirements: no such file {path}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def venv_python(venv_dir: str | os.PathLike = DEFAULT_VENV) -> Path:
    """The interpreter of the venv at ``venv_dir`` (POSIX layout)."""
    return Path(venv_dir) / "bin" / "python"


def stamp_value(requirements: str | os.PathLike = DEFAULT_REQUIREMENTS, layer_over: str | os.PathLike | None = None) -> str:
    """What a current venv's stamp holds: the requirements' hash; for a layered venv (see
    :func:`ensure_env`), the SHA-256 of that hash and the base site-packages path."""
    digest = requirements_hash(requirements)
    if layer_over is None:
        return digest
    return hashlib.sha256(f"{digest}\n{Path(layer_over).resolve()}".encode()).hexdigest()


def is_current(
    venv_dir: str | os.PathLike = DEFAULT_VENV,
    requirements: str | os.PathLike = DEFAULT_REQUIREMENTS,
    layer_over: str | os.PathLike | None = None,
) -> bool:
    """True when the venv has an interpreter and a stamp equal to :func:`stamp_value`."""
    stamp = Path(venv_dir) / STAMP_NAME
    return (
        venv_python(venv_dir).exists()
        and stamp.is_file()
        and stamp.read_text().strip() == stamp_value(requirements, layer_over)
    )


def _run(cmd: list[str], timeout: float) -> None:
    """Run ``cmd``; raise ``RuntimeError`` with the tail of its output when it fails."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def ensure_env(
    venv_dir: str | os.PathLike = DEFAULT_VENV,
    requirements: str | os.PathLike = DEFAULT_REQUIREMENTS,
    python: str | os.PathLike | None = None,
    timeout: float = 3600.0,
    verbose: bool = False,
    layer_over: str | os.PathLike | None = None,
) -> Path:
    """Return the interpreter of an up-to-date MONAI Label venv at ``venv_dir``, building it first when
    its stamp does not match ``requirements`` (the build takes minutes: torch with its CUDA libraries
    is most of it; a reuse takes milliseconds).

    Args:
        venv_dir: where the venv lives (deleted and rebuilt when stale).
        requirements: pinned requirements file (``==`` pins, installed with ``--no-deps``).
        python: interpreter that creates the venv (default: the running one; a venv made from a venv
            is based on the same base interpreter).
        timeout: seconds allowed for each of ``venv`` and ``pip install``.
        verbose: print the time the build took to stderr.
        layer_over: a site-packages directory (e.g. the main venv's) that the new venv sees after its
            own packages, through a ``.pth`` file: only what ``requirements`` lists is installed, anything
            else is imported from there. ``None`` (MONAI Label): a self-contained venv.
    """
    venv_dir = Path(venv_dir).resolve()
    digest = stamp_value(requirements, layer_over)
    if layer_over is not None and not Path(layer_over).is_dir():
        raise FileNotFoundError(f"layer_over: no such directory {layer_over}")
    if timeout <= 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_name = f"monai_label_env-{hashlib.sha256(str(venv_dir).encode()).hexdigest()[:16]}.lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_current(venv_dir, requirements, layer_over):
            return venv_python(venv_dir)
        start = time.perf_counter()
        if venv_dir.exists():
            shutil.rmtree(venv_dir)
        _run([str(python or sys.executable), "-m", "venv", str(venv_dir)], timeout)
        _run(
            [str(venv_python(venv_dir)), "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
             "-r", str(Path(requirements).resolve())],
            timeout,
        )
        if layer_over is not None:  # after the install: pip would take the base's packages as installed
            purelib = subprocess.run(
                [str(venv_python(venv_dir)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True, timeout=timeout,
            ).stdout.strip()
            # site appends a .pth file's paths after the venv's own site-packages: the venv's packages win
            (Path(purelib) / LAYER_PTH).write_text(f"{Path(layer_over).resolve()}\n")
        from common.io import atomic_write_text

        atomic_write_text(venv_dir / STAMP_NAME, digest + "\n")
        if verbose:
            print(f"built {venv_dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return venv_python(venv_dir)


def main(venv_dir: str = str(DEFAULT_VENV), requirements: str = str(DEFAULT_REQUIREMENTS)) -> str:
    """Command line: build or reuse the venv and print its interpreter."""
    return str(ensure_env(venv_dir, requirements, verbose=True))


if __name__ == "__main__":
    from scripts.cli import run

    run(main)
