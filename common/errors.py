"""Bad input reported as one line naming the file or argument.

:class:`InputError` is the ``ValueError`` that the data checks raise (a file that cannot be read, an image
with NaN, a label off the image's grid, an empty datalist section). MONAI wraps errors raised inside a
config item (``RuntimeError: Failed to instantiate ...``, ``applying transform ...``), so the name of the
file ends up in the middle of a long chained traceback; :func:`one_line` digs it out again.

``python -m monai.bundle run`` is not our command line, so a bundle run gets the same convention through
:func:`install_excepthook`, installed when this module is imported in such a process: an uncaught error
whose chain holds an :class:`InputError` prints ``error: <message>`` on one line (exit status 1, as any
uncaught error); ``ROBUST_SEG_DEBUG=1`` in the environment restores the full traceback. Any other error,
and an interactive session, keeps Python's usual traceback.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["InputError", "MissingInputError", "one_line", "find_input_error", "install_excepthook"]

DEBUG_ENV = "ROBUST_SEG_DEBUG"


class InputError(ValueError):
    """Bad input (a file, a datalist, an argument); the message names it."""


class MissingInputError(InputError, FileNotFoundError):
    """A file named by the input does not exist."""


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes / contexts, outermost first."""
    out: list[BaseException] = []
    while err is not None and all(err is not e for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


_RERAISED = re.compile(r"^common\.errors\.(?:Missing)?InputError: (.+)$", re.MULTILINE)


def find_input_error(err: BaseException) -> InputError | None:
    """The outermost :class:`InputError` in the chain of ``err``, if any — also one that a DataLoader
    worker process raised, which torch re-raises as text inside another error's message."""
    found = next((e for e in _chain(err) if isinstance(e, InputError)), None)
    if found is not None:
        return found
    for e in _chain(err):
        match = _RERAISED.findall(str(e))
        if match:
            return InputError(match[-1].strip())
    return None


def one_line(err: BaseException, limit: int = 600) -> str:
    """The message of ``err`` on one line: its :class:`InputError` if the chain holds one; else the
    outermost error with a message, prefixed with its type unless it is a ``ValueError``/``OSError``."""
    chosen = find_input_error(err)
    if chosen is None:
        chosen = next((e for e in _chain(err) if str(e).strip()), err)
    text = " ".join(str(chosen).split()) or type(chosen).__name__
    if not isinstance(chosen, (ValueError, OSError)):
        text = f"{type(chosen).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hook(exc_type, exc, tb, previous=sys.__excepthook__) -> None:
    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    if exc is None or interactive or os.environ.get(DEBUG_ENV) or find_input_error(exc) is None:
        previous(exc_type, exc, tb)
        return
    sys.stdout.flush()
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Print an uncaught error that holds an :class:`InputError` as one line (see the module docstring)."""
    if getattr(sys.excepthook, "__name__", "") == "_robust_seg_hook":
        return
    previous = sys.excepthook

    def _robust_seg_hook(exc_type, exc, tb):
        _hook(exc_type, exc, tb, previous)

    sys.excepthook = _robust_seg_hook


def _running_monai_bundle() -> bool:
    """True in ``python -m monai.bundle ...`` (``sys.argv[0]`` is MONAI's ``bundle/__main__.py``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0.replace("\\", "/").endswith("monai/bundle/__main__.py")


if _running_monai_bundle():
    install_excepthook()
