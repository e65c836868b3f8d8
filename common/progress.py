"""Training progress that reads cleanly in a terminal and in a log file.

Why not ignite's ``ProgressBar`` as it is: (1) its bar is redrawn on stderr with ``\\r`` and no newline,
so a log record written to stdout meanwhile (MONAI's ``StatsHandler``) continues the bar's line —
``Epoch [17/20]: [3/6]  50%|█████ [00:00<00:00]2026-12-04 … INFO - …``; (2) when stderr is a file (CI,
``2> log``) every redraw is kept, one frame per iteration.

:class:`ProgressBar` is ignite's bar (same arguments) that (1) routes the records of the root logger's
console handlers through tqdm's ``external_write_mode`` while it is shown — the bar is cleared, the
record written on its own line, the bar redrawn below — and (2) shows no bar at all unless its stream
is a terminal (the per-iteration ``StatsHandler`` lines already report progress in a log).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ignite.handlers import ProgressBar as _IgniteProgressBar

__all__ = ["ProgressBar", "is_terminal", "write_records_around_bars"]


def is_terminal(stream: Any) -> bool:
    """True if ``stream`` (a file object) is attached to a terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def write_records_around_bars() -> bool:
    """Make every ``logging.StreamHandler`` that writes to stdout or stderr (the root logger's console
    handler from a bundle's ``logging.conf``, MONAI's own ``StatsHandler`` logger ...) write its records
    through ``tqdm.external_write_mode``: visible tqdm bars are cleared first and redrawn after, so a record
    never shares a line with a bar. Other streams (log files) are untouched, and with no bar on screen
    the write is the same. Patched once on the class, since handlers are also created after the bar is
    attached; returns True the first time."""
    if getattr(logging.StreamHandler.emit, "_writes_around_bars", False):
        return False
    from tqdm.std import tqdm

    emit = logging.StreamHandler.emit

    def around_bars(self, record):
        stream = getattr(self, "stream", None)
        if stream is None or stream not in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            return emit(self, record)
        with tqdm.external_write_mode(file=stream):
            return emit(self, record)

    around_bars._writes_around_bars = True
    logging.StreamHandler.emit = around_bars
    return True


class ProgressBar(_IgniteProgressBar):
    """``ignite.handlers.ProgressBar`` that never shares a line with a log record and shows no bar unless
    its stream (``file``, default stderr) is a terminal (see the module docstring).

    Args:
        terminal_only: False keeps ignite's behaviour on a non-terminal stream (``disable`` given
            explicitly wins as well).
        persist, bar_format, tqdm_kwargs: as ignite's ``ProgressBar``.
    """

    def __init__(self, *args: Any, terminal_only: bool = True, **tqdm_kwargs: Any) -> None:
        if terminal_only and "disable" not in tqdm_kwargs:
            tqdm_kwargs["disable"] = not is_terminal(tqdm_kwargs.get("file") or sys.stderr)
        super().__init__(*args, **tqdm_kwargs)

    def attach(self, engine, *args: Any, **kwargs: Any) -> None:
        super().attach(engine, *args, **kwargs)
        if not self.tqdm_kwargs.get("disable", False):
            write_records_around_bars()
