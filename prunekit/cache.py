"""Where generated artefacts live ($PRUNEKIT_CACHE, default ~/.cache/prunekit), and building one exactly once."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def build_once(path: Path, complete: Callable[[Path], bool], write: Callable[[Path], object], missing: str) -> Path:
    """``path``, first written by ``write(tmp)`` into a temporary sibling and renamed, so readers see all of it or
    nothing; a process that loses the race drops its copy. ``missing`` names what an incomplete ``path`` lacks."""
    if not complete(path):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write(tmp)  # its errors propagate; only a lost rename race is expected
            try:
                tmp.rename(path)  # atomic; fails if another process got there first
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not complete(path):
            raise FileNotFoundError(f"{path} exists but lacks {missing}; delete it to rebuild")
    return path
