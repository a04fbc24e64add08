"""Manifests of many clips (JSONL or CSV), resumable runs and the per-clip summary.

A manifest row names at least `face` and `audio`; optional: name, output, emotion, intensity,
seed, max_seconds, features. Relative paths are relative to the manifest's folder; any path may
be local or gs://. A run writes
each finished clip atomically, skips clips whose output already exists, records every clip's
outcome (done, skipped, error with its reason) in <output_dir>/summary.json, and goes on past
clips whose inputs are bad.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Iterable

from keyface_jax.generation.inputs import ClipRequest
from keyface_jax.paths import as_path, is_url, read_json, write_json

FIELDS = ("name", "face", "audio", "output", "emotion", "intensity", "seed", "max_seconds", "features")


def _typed(row: dict, where: str) -> dict:
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    missing = [k for k in ("face", "audio") if not row.get(k)]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    out = {k: v for k, v in row.items() if v not in (None, "")}
    for key, cast in (("intensity", float), ("seed", int), ("max_seconds", float)):
        if key in out:
            try:
                out[key] = cast(out[key])
            except ValueError:
                raise ValueError(f"{where}: {key}={out[key]!r} is not a number") from None
    return out


def _resolve(base, value: str) -> str:
    """A manifest's relative path, taken from the manifest's folder (local or gs://)."""
    return value if is_url(value) or os.path.isabs(value) else os.fspath(base / value)


def read_manifest(path: str) -> list[dict]:
    """Rows of a .jsonl / .json (list) / .csv manifest (local or gs://), paths made absolute."""
    if not as_path(path).is_file():
        raise ValueError(f"{path}: manifest not found")
    base = as_path(path).parent
    text = as_path(path).read_text()
    if path.endswith(".csv"):
        rows = [(f"{path} row {i + 2}", dict(r))
                for i, r in enumerate(csv.DictReader(io.StringIO(text, newline="")))]
    elif path.endswith(".json"):
        rows = [(f"{path} item {i}", r) for i, r in enumerate(json.loads(text))]
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append((f"{path} line {i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {i + 1}: not JSON ({e})") from None
    out = []
    for where, row in rows:
        row = _typed(row, where)
        for key in ("face", "audio", "output", "features"):
            if key in row:
                row[key] = _resolve(base, row[key])
        if isinstance(row.get("emotion"), str) and row["emotion"].endswith(
                (".npy", ".npz", ".json", ".csv")):
            row["emotion"] = _resolve(base, row["emotion"])
        out.append(row)
    return out


def requests_from_rows(rows: Iterable[dict], output_dir: str, defaults: dict) -> list[ClipRequest]:
    """ClipRequests with unique names (from the audio file's stem unless given) and outputs
    (<output_dir>/<name>.mp4 unless given)."""
    requests, seen = [], set()
    for row in rows:
        name = row.get("name") or os.path.splitext(os.path.basename(row["audio"]))[0]
        base, k = name, 1
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        values = dict(defaults, **{k: v for k, v in row.items() if k != "name"})
        values.setdefault("output", os.fspath(as_path(output_dir) / f"{name}.mp4"))
        requests.append(ClipRequest(name=name, **values))
    return requests


class Summary:
    """<output_dir>/summary.json, rewritten atomically after every change."""

    def __init__(self, path: str):
        self.path = path
        self.clips: dict[str, dict] = {}
        if as_path(path).is_file():
            self.clips = {c["name"]: c for c in read_json(path).get("clips", [])}

    def record(self, name: str, **fields) -> None:
        self.clips[name] = dict(name=name, time=time.strftime("%Y-%m-%dT%H:%M:%S"), **fields)
        counts = {}
        for clip in self.clips.values():
            counts[clip["status"]] = counts.get(clip["status"], 0) + 1
        write_json(self.path, dict(counts=counts, clips=list(self.clips.values())), indent=1)
