"""Files that several processes, and threads of one, write at once (the capture and tuning caches), and
temporary folders that live as long as what reads them."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path


def replace_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary file of this process and thread beside ``path``, then renamed onto it:
    readers find the old file or the new one whole, and writers at once never share a temporary file (one shared
    name let two writers interleave their bytes)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    write(tmp)
    tmp.replace(path)


class OwnedFolder:
    """A temporary folder (``path``) removed when the last object holding it is collected, or at exit: each
    compile for ONNX Runtime writes its graph and weights to one, which its session reopens when the module is
    copied, and left behind they filled the disk (tens of GB over a test run). Copies of a holder share the folder;
    a pickled one reads it without owning it."""

    def __init__(self, prefix: str) -> None:
        self.path = tempfile.mkdtemp(prefix=prefix)
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, True)

    def remove(self) -> None:
        self._remove()

    def __copy__(self) -> OwnedFolder:
        return self

    def __deepcopy__(self, memo) -> OwnedFolder:
        return self

    def __reduce__(self):
        return _Borrowed, (self.path,)


class _Borrowed:
    def __init__(self, path: str) -> None:
        self.path = path

    def remove(self) -> None:
        pass
