"""One path type for everything a job reads or writes: `etils.epath.Path`, so a local folder
(relative or absolute) and a `gs://bucket/...` URL work alike.

- `as_path` turns whatever the user gave into an absolute epath (a relative local path is
  resolved against the working directory once, so a library that wants absolute paths, Orbax
  for one, never sees a relative one; a URL is kept as it is).
- Libraries that only take local files (PyAV for media, Pillow, ArrayRecord's writer, matplotlib)
  go through `local_copy` (read: a remote file is downloaded to a temporary file) and
  `staged_output` (write: the file is made locally and then moved or uploaded in one piece).
- `write_bytes` / `write_text` / `write_json` replace a file whole: on a local disk through a
  temporary name and a rename (a reader never sees half a file), on GCS by one upload (an
  object write is atomic there).
- `AppendLog` is an append-only text file (metrics.jsonl) that GCS, whose objects cannot be
  appended to, can hold too: lines are kept in a local mirror and the whole file is uploaded at
  most every `upload_seconds` and on close.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

from etils import epath

PathLike = str | os.PathLike | epath.Path


def is_url(path: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://), False for local ones."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An absolute epath: local paths resolved against the current directory, URLs unchanged."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def canonical(path: PathLike) -> str:
    """The path as one string whatever form it was given in (relative, absolute, with `..` or a
    symlink): what a record of "which input was used" should store."""
    text = os.fspath(path)
    return text.rstrip("/") if is_url(text) else os.path.realpath(os.path.expanduser(text))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replaces `path` with `data` in one piece (parents created)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any, **kwargs) -> None:
    write_text(path, json.dumps(value, **kwargs) + "\n")


def read_json(path: PathLike) -> Any:
    return json.loads(as_path(path).read_text())


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local file name with the contents of `path` (the file itself when it is local)."""
    path = as_path(path)
    if not is_url(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="keyface_in_") as tmp:
        local = os.path.join(tmp, path.name)
        with path.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


@contextlib.contextmanager
def staged_output(path: PathLike) -> Iterator[str]:
    """A local file name to write `path`'s new contents to; when the block ends without an
    error the file replaces `path` whole (a rename on a local disk, one upload to GCS). Nothing
    happens to `path` if the block wrote no file."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="keyface_out_") as tmp:
            local = os.path.join(tmp, path.name)
            yield local
            if os.path.exists(local):
                with open(local, "rb") as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        return
    root, ext = os.path.splitext(path.name)
    local = os.fspath(path.parent / f".{root}.tmp{os.getpid()}{ext}")
    try:
        yield local
        if os.path.exists(local):
            os.replace(local, path)
    finally:
        if os.path.exists(local):
            os.remove(local)


class AppendLog:
    """An append-only text file on a local disk or GCS (see the module docstring)."""

    def __init__(self, path: PathLike, upload_seconds: float = 30.0):
        self.path = as_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = is_url(self.path)
        self._upload_seconds, self._uploaded = upload_seconds, time.monotonic()
        if self._remote:
            self._lines = [self.path.read_text()] if self.path.exists() else []
            self._dirty = False
        else:
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, line: str) -> None:
        if not self._remote:
            self._file.write(line)
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._uploaded >= self._upload_seconds:
            self.flush()

    def flush(self) -> None:
        if self._remote and self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()


def publish(local: str, path: PathLike) -> None:
    """Moves a finished local file to `path`: a rename on a local disk (the same folder keeps it
    atomic), an upload (then the local copy is removed) for a URL."""
    path = as_path(path)
    if is_url(path):
        with open(local, "rb") as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(local)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, path)
