"""``MOECC_LOGS`` selects the level of the ``moecc`` loggers; output goes through ``logging``."""

from __future__ import annotations

import logging

from moecc import knobs

_configured = False


def configure() -> None:
    global _configured
    level_name = str(knobs.LOGS.get()).upper()
    level = getattr(logging, level_name, None)
    if not isinstance(level, int):
        raise ValueError(f"MOECC_LOGS must be one of debug, info, warning, error; got {knobs.LOGS.get()!r}")
    logger = logging.getLogger("moecc")
    logger.setLevel(level)
    if not _configured and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[moecc %(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        _configured = True
