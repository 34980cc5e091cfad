"""File access through fsspec so every output path may be local, `gs://`, `s3://` or any fsspec URL."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and in-filesystem path of `url`."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/' (os.path.join would break gs:// on Windows and is not needed)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    """True when `url` is a plain path on this machine."""
    return isinstance(filesystem(url)[0], LocalFileSystem)


@contextmanager
def atomic_write(url: str) -> Iterator[str]:
    """Yield a local path to write; on success it appears at `url` whole, never half-written.

    Local: a hidden temp file in the destination folder, then an atomic rename. Remote: an object-store
    upload, which becomes visible only when complete.
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="text2earth-") as tmpdir:
        tmp = os.path.join(tmpdir, os.path.basename(path))
        yield tmp
        fs.put_file(tmp, path)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted file names (not paths) directly under `url` ending with `suffix`; [] if it is missing."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if n.endswith(suffix))


def remove(url: str) -> None:
    """Delete a file if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def remove_tree(url: str) -> None:
    """Delete a folder and everything under it, if it exists."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        shutil.rmtree(path, ignore_errors=True)
    elif fs.exists(path):
        fs.rm(path, recursive=True)


def read_bytes(url: str) -> bytes:
    """Whole content of a (small) file."""
    with fsspec.open(url, "rb") as fh:
        return fh.read()


def exists(url: str) -> bool:
    """True when a file or folder exists at `url`."""
    fs, path = filesystem(url)
    return bool(fs.exists(path))
