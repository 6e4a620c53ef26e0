"""Files that several processes, and threads of one, write at once (the capture and tuning caches)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def replace_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary file of this process and thread beside ``path``, then renamed onto it:
    readers find the old file or the new one whole, and writers at once never share a temporary file (one shared
    name let two writers interleave their bytes)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    write(tmp)
    tmp.replace(path)
