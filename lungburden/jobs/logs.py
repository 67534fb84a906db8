"""Logging set-up shared by the node's commands (``serve``, ``pull``) and the Orthanc plugin's worker."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from lungburden.config.schema import Config

#: The node's log lines (standard error and ``logging.file``).
NODE_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(
    config: Config,
    verbose: bool = False,
    stream_format: str = NODE_FORMAT,
    file_format: str | None = None,
    replace_handlers: bool = False,
    quiet: Iterable[str] = ("pynetdicom",),
) -> None:
    """Apply ``logging.level`` / ``logging.file``; the chatter of the ``quiet`` libraries (pynetdicom
    logs every PDU) stays at WARNING unless ``verbose`` (everything at DEBUG).

    Standard error gets ``stream_format`` (a handler is added only if the root logger has none, or
    replaces them with ``replace_handlers``); the log file gets ``file_format`` (default: the same).
    """
    root = logging.getLogger()
    if replace_handlers:
        root.handlers.clear()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(stream_format))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, config.logging.level))
    if config.logging.file is not None:
        Path(config.logging.file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(config.logging.file)
        file_handler.setFormatter(logging.Formatter(file_format or stream_format))
        root.addHandler(file_handler)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
