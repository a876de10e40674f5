"""Loggers for the device-side modules that import ``logging`` on their first message.

Loading a package logs nothing on success, and importing ``logging`` (with ``traceback``,
``string`` and ``threading`` behind it) takes about 4 ms of a device's cold start (CPython 3.11
on a 2-vCPU x86-64 VM). ``get_logger(name)`` returns a stand-in that fetches
``logging.getLogger(name)`` on first use, so applications configure these loggers by name
exactly as usual.
"""

from __future__ import annotations

import sys
from typing import Any


class LazyLogger:
    """A stand-in for ``logging.getLogger(name)`` that imports ``logging`` when first used.

    ``debug`` and ``info`` messages are dropped while no module has imported ``logging``: then
    nothing can have configured a handler or a level, and Python's fallback handler shows only
    warnings and errors, so the message would not appear anywhere either.
    """

    __slots__ = ("name", "_logger")

    def __init__(self, name: str):
        self.name = name
        self._logger: Any = None

    def __getattr__(self, attribute: str) -> Any:
        # Called only for what the slots do not hold: the Logger's methods and attributes.
        return getattr(self._real(), attribute)

    def _real(self) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().debug(message, *args, **kwargs)

    def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().info(message, *args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyLogger({self.name!r})"


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
