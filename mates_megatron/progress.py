"""Progress for a terminal and for a log file: tqdm's bar on a terminal, plain periodic lines elsewhere.

A bar redrawn with ``\\r`` turns a Slurm log (or any redirected stderr) into thousands of frames on one line.
``progress(...)`` takes tqdm's arguments as the package uses them; when its stream is no terminal it writes one
line at most every ``interval`` seconds and one when it closes::

    [influence predict] 1200/5000 (24%) 310 it/s
    [influence predict] 5000/5000 (100%) 305 it/s, done in 16.4s

The interval is 30 seconds unless ``interval=`` or the environment's ``MATES_PROGRESS_INTERVAL`` says otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

INTERVAL_S = 30.0
"""Seconds between two lines of a progress that writes to no terminal (default)."""


def _interval(interval: float | None) -> float:
    if interval is not None:
        return interval
    text = os.environ.get("MATES_PROGRESS_INTERVAL")
    try:
        return float(text) if text else INTERVAL_S
    except ValueError:
        raise ValueError(
            f"MATES_PROGRESS_INTERVAL={text!r}: give seconds between progress lines, e.g. 30"
        ) from None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = True,
    disable: bool = False,
    file: TextIO | None = None,
    interval: float | None = None,
) -> Any:
    """A progress over ``iterable`` (or, without one, advanced by ``update(n)``): tqdm's calling shape and
    methods (iteration, ``update``, ``set_postfix``, ``close``, ``with``). A tqdm bar when ``file`` (default
    stderr) is a terminal, else a ``LineProgress``; nothing is written with ``disable=True``."""
    stream = file if file is not None else sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=stream)
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, file=stream, interval=_interval(interval)
    )


class LineProgress:
    """tqdm's interface written as whole lines: at most one every ``interval`` seconds, and a final one."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        file: TextIO | None = None,
        interval: float = INTERVAL_S,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress() without an iterable is advanced by update(n), not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        self._write(now, done=f", done in {now - self.start:.1f}s")

    def _write(self, now: float, done: str = "") -> None:
        n, total = _number(self.n), self.total
        count = f"{n}/{_number(total)} ({100 * self.n / total:.0f}%)" if total else f"{n} {self.unit}"
        elapsed = now - self.start
        rate = f" {_number(self.n / elapsed)} {self.unit}/s" if elapsed > 0 else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        self.file.write(f"[{self.desc or 'progress'}] {count}{rate}{postfix}{done}\n")
        self.file.flush()


def _number(x: float) -> str:
    """1200, 310, 12.5, 0.031: whole counts as integers, rates to three significant digits."""
    if float(x).is_integer() or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"
