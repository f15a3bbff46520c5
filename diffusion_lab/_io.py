"""Atomic file writes, shared by the command line and the figures (the package's only writers of user files)."""
from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then ``os.replace(tmp, path)``.

    The rename is atomic on one file system, so a reader sees the old file or the whole new one, never a partial
    one; a failed ``write`` leaves no temporary file behind. The temporary name keeps ``path``'s extension (a
    figure writer can infer the format from it).

    Parameters
    ----------
    path : str
        The file to create or replace.
    write : callable
        ``write(tmp_path)`` writes the complete contents to ``tmp_path``.
    """
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
