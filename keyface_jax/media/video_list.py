"""A list of video files: a folder searched recursively, or a list file; stable names, groups, splits.

`--videos` is a folder (searched recursively for video files) or a text file list. A list has one
video per line: `path`, `path<TAB>group` or `path<TAB>group<TAB>split` (relative paths are relative
to the list's folder; blank lines and lines starting with '#' are ignored).

A video's name is its path relative to the folder (for a list: to the deepest folder common to
all listed videos), without extension, with '/' separators: stable across runs and hosts. In a
folder, the group is the first sub-folder (`root/<group>/.../clip.mp4`), else "default".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv")


@dataclasses.dataclass(frozen=True, order=True)
class VideoItem:
    name: str
    path: str
    group: str = "default"
    split: str = "train"


def _name(relative: str) -> str:
    stem, _ = os.path.splitext(relative)
    return stem.replace(os.sep, "/")


def _from_folder(root: str, extensions: Sequence[str]) -> list[VideoItem]:
    items = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for f in files:
            if f.lower().endswith(tuple(extensions)) and not f.startswith("."):
                rel = os.path.relpath(os.path.join(folder, f), root)
                parts = rel.split(os.sep)
                group = parts[0] if len(parts) > 1 else "default"
                items.append(VideoItem(_name(rel), os.path.join(folder, f), group))
    return items


def _from_list(list_file: str) -> list[VideoItem]:
    base = os.path.dirname(os.path.abspath(list_file))
    rows = []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cols = [c.strip() for c in line.split("\t")]
            if len(cols) > 3:
                raise ValueError(f"{list_file}:{number}: expected path[<TAB>group[<TAB>split]]")
            path = os.path.normpath(os.path.join(base, cols[0]))
            rows.append((path, cols[1] if len(cols) > 1 and cols[1] else "default",
                         cols[2] if len(cols) > 2 and cols[2] else "train"))
    if not rows:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p, _, _ in rows])
    return [VideoItem(_name(os.path.relpath(p, common)), p, g, s) for p, g, s in rows]


def list_videos(spec: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoItem]:
    """All videos named by a folder or a list file, sorted by name, with absolute paths (a record
    of them means the same file whatever the working directory). Names that would collide
    (clip.mp4 and clip.mov) keep their extension; a path listed twice is an error."""
    if os.path.isdir(spec):
        items = _from_folder(os.path.abspath(spec), extensions)   # absolute paths, any cwd
    elif os.path.isfile(spec):
        items = _from_list(spec)
    else:
        raise FileNotFoundError(f"--videos {spec!r} is neither a folder nor a list file")
    paths = [os.path.abspath(i.path) for i in items]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"videos listed more than once: {dup[:5]}")
    names = [i.name for i in items]
    clash = {n for n in names if names.count(n) > 1}
    items = [dataclasses.replace(i, name=i.name + os.path.splitext(i.path)[1])
             if i.name in clash else i for i in items]
    return sorted(items)
