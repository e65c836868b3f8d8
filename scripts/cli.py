"""Argument parsing shared by the command-line tools, and their error convention (:func:`run`): bad input
prints `error: <what>, <file or argument>` on one line and exits with status 2; `--debug` adds the traceback."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["parse_size", "run", "check_device", "check_range", "check_overrides", "EXIT_BAD_INPUT"]


def parse_size(size: Any, ndim: int, name: str = "size") -> tuple[int, ...]:
    """A spatial size as fire hands it over — an int (repeated over ``ndim`` axes), a tuple / list, or a
    string "128,128" / "128x128" / "(128, 128)" — as a tuple of ``ndim`` ints. Raises ``ValueError``
    naming ``name`` otherwise."""
    if isinstance(size, str):
        parts = [p for p in size.replace("x", ",").replace("(", "").replace(")", "").split(",") if p.strip()]
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"{name}: expected integers like '128,128', got {size!r}") from None
        size = size[0] if len(size) == 1 else size
    if isinstance(size, bool):
        raise ValueError(f"{name}: expected {ndim} integers, got {size!r}")
    if isinstance(size, int):
        size = (size,) * ndim
    if not isinstance(size, Sequence) or len(size) != ndim:
        raise ValueError(f"{name}: expected an int or {ndim} integers, got {size!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in size):
        raise ValueError(f"{name}: expected {ndim} integers, got {size!r}")
    return tuple(size)


# ----------------------------------------------------------------------------- the error convention

#: exit status of a command refused for bad input (as argparse uses)
EXIT_BAD_INPUT = 2


def check_device(device: Any, name: str = "device"):
    """``device`` ("cpu", "cuda", "cuda:1", a ``torch.device``) as a ``torch.device``; raises
    :class:`common.errors.InputError` naming ``name`` for an unknown device, or CUDA without a GPU."""
    import torch

    from common.errors import InputError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"{name}: not a device, {device!r} ({' '.join(str(err).split())})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name}: {device!r} asked for, but CUDA is not available on this machine "
                             "(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{name}: {device!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


def check_range(values: Any, name: str, low: float | None = None, high: float | None = None,
                unit: str = "") -> None:
    """Every number of ``values`` (a number or a sequence of numbers, as fire parses ``"[0.1,0.2]"``) must
    lie in ``(low, high]`` (an open bound where None). Raises :class:`common.errors.InputError` naming
    ``name`` and the value; anything that is not numbers is left to the command's own checks."""
    from common.errors import InputError

    items = [values] if isinstance(values, (int, float)) else values
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        return
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return
    span = f"({'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
    for v in items:
        if v != v or (low is not None and not v > low) or (high is not None and not v <= high):
            raise InputError(f"{name}: {v!r} is out of range, expected values in {span}{unit}")


def _config_path(bundle_root: Any, config: Any):
    from pathlib import Path

    if not isinstance(bundle_root, str) or not isinstance(config, str):
        return None
    path = Path(config)
    for candidate in (path, Path(bundle_root) / "configs" / config, Path(bundle_root) / config):
        if candidate.is_file():
            return candidate
    return None


def check_overrides(overrides: Any, bundle_root: Any, config: Any = "inference.json", name: str = "overrides") -> None:
    """Refuse an override id that the bundle's config does not have (it would be set and never read).

    ``overrides`` is a dict or its JSON text; an id nested under a component (``network_def#dropout``,
    a ``_target_`` dict) may be new — it becomes a constructor argument, which the component checks.
    Nothing is checked when the config cannot be found (the command reports that itself)."""
    import json

    from monai.bundle import ConfigParser

    from common.errors import InputError

    if isinstance(overrides, str):
        if not overrides.strip():
            return
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise InputError(f"{name}: expected a JSON object, got {overrides!r} ({err})") from None
    if not overrides:
        return
    if not isinstance(overrides, Mapping):
        raise InputError(f"{name}: expected a JSON object of config ids, got {overrides!r}")
    path = _config_path(bundle_root, config)
    if path is None:
        return
    parser = ConfigParser()
    try:
        parser.read_config(str(path))
    except Exception:
        return
    for key in overrides:
        if str(key) in parser:
            continue
        parent = str(key).rsplit("#", 1)[0] if "#" in str(key) else None
        if parent is not None and parent in parser and isinstance(parser[parent], dict) and "_target_" in parser[parent]:
            continue
        raise InputError(f"{name}: the bundle config {path} has no id '{key}'")


def _checked(main: Callable, ranges: Mapping[str, tuple]) -> Callable:
    """``main`` with the argument checks of :func:`run` in front (same signature, for fire)."""
    import functools
    import inspect

    signature = inspect.signature(main)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return main(*args, **kwargs)  # fire reports the missing / extra argument
        bound.apply_defaults()
        values = bound.arguments
        if "device" in values and values["device"] is not None:
            check_device(values["device"])
        for arg, bounds in ranges.items():
            if arg in values and values[arg] is not None:
                check_range(values[arg], arg, *bounds)
        if "overrides" in values and "bundle_root" in values:
            check_overrides(values["overrides"], values["bundle_root"], values.get("config", "inference.json"))
        return main(*args, **kwargs)

    return wrapper


class _UsageError(Exception):
    """fire could not map the command line onto the function."""


def _check_arguments(main: Callable, args: Sequence[str]) -> None:
    """Refuse, before ``main`` runs, a ``--flag`` that is not one of its parameters and more positional
    values than it has parameters (fire would run ``main`` first and complain afterwards)."""
    import inspect
    import re

    def is_flag(token: str) -> bool:  # fire's rule: "--name", "-n", "-name"; "-0.5" is a value
        return token.startswith("--") and len(token) > 2 or re.match(r"-[a-zA-Z]", token) is not None

    try:
        params = inspect.signature(main).parameters
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return
    named = [n for n, p in params.items() if p.kind != inspect.Parameter.VAR_POSITIONAL]
    given, positional, i = set(), [], 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if is_flag(token):
            name = token.lstrip("-").split("=", 1)[0].replace("-", "_")
            if name in ("help", "h", "helpfull", "interactive", "completion", "separator", "trace", "verbose"):
                return  # fire's own flags
            shortcut = [n for n in params if len(name) == 1 and n[0] == name]
            if len(shortcut) == 1:  # fire's one-letter shortcut
                name = shortcut[0]
            if name not in params and not (name.startswith("no") and name[2:] in params):
                raise _UsageError(f"unknown argument {token.split('=', 1)[0]}")
            given.add(name)
            if "=" not in token and i + 1 < len(args) and not is_flag(args[i + 1]):
                i += 1
        else:
            positional.append(token)
        i += 1
    free = [n for n in named if n not in given]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(positional) > len(free):
        raise _UsageError(f"unexpected argument {positional[len(free)]!r}")


def _fire_usage_as_exception():
    """A context in which fire raises :class:`_UsageError` instead of printing its multi-line usage error
    (``--help`` keeps fire's help text)."""
    import contextlib

    import fire.core

    @contextlib.contextmanager
    def context():
        original = getattr(fire.core, "_DisplayError", None)

        def display(trace):
            if original is None or any(h in trace.elements[-1].args for h in ("-h", "--help")):
                return original(trace)
            raise _UsageError(trace.elements[-1].ErrorAsStr())

        if original is not None:
            fire.core._DisplayError = display
        try:
            yield
        finally:
            if original is not None:
                fire.core._DisplayError = original

    return context()


def _argparse_errors_as_exception():
    """A context in which ``argparse`` raises :class:`_UsageError` instead of printing usage and exiting."""
    import argparse
    import contextlib

    @contextlib.contextmanager
    def context():
        original = argparse.ArgumentParser.error

        def error(self, message):
            raise _UsageError(message)

        argparse.ArgumentParser.error = error
        try:
            yield
        finally:
            argparse.ArgumentParser.error = original

    return context()


def run(main: Callable, argv: Sequence[str] | None = None, *, parses_argv: bool = False,
        ranges: Mapping[str, tuple] | None = None, **fire_kwargs: Any) -> Any:
    """Run a command-line tool under the project's error convention.

    ``main`` is handed to ``fire.Fire`` (``fire_kwargs`` such as ``serialize``), or, with
    ``parses_argv=True``, called with the argument list (an argparse / fire ``main(argv)``). Bad input —
    an error fire or argparse finds, any exception ``main`` raises — prints one line on stderr,
    ``error: <what>, <file or argument>`` (see :func:`common.errors.one_line`), and exits with status 2;
    ``--debug`` anywhere on the command line prints the traceback first. Before ``main`` runs, arguments
    named ``device`` go through :func:`check_device`, ``overrides`` (with ``bundle_root`` / ``config``)
    through :func:`check_overrides`, and those named in ``ranges`` (``{"eps": (0, 1)}``) through
    :func:`check_range`.
    """
    import logging
    import sys
    import traceback
    import warnings

    import fire

    from common.errors import one_line

    # MONAI's DICOM reader says on every LoadImage that a GPU decoder is missing (CPU machines)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        if parses_argv:
            for i, token in enumerate(args):  # the same device check as for fire's functions
                if token.startswith("--device="):
                    check_device(token.split("=", 1)[1])
                elif token == "--device" and i + 1 < len(args):
                    check_device(args[i + 1])
            with _argparse_errors_as_exception(), _fire_usage_as_exception():
                return main(args)
        with _fire_usage_as_exception():
            component = main
            if callable(main) and not isinstance(main, type):
                _check_arguments(main, args)
                component = _checked(main, dict(ranges or {}))
            return fire.Fire(component, command=args, **fire_kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 — every error becomes the one line
        if debug:
            traceback.print_exc()
        message = str(err) + " (see --help)" if isinstance(err, _UsageError) else one_line(err)
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
