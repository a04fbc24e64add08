"""Preparing a dataset, resumably, on one or several hosts.

Layout of an output folder:

    OUT/{name}-{split}.array_record-*   the records (after the merge)
    OUT/dataset_info.json, features.json, metadata.json, videos.json, summary.json
    OUT/_prepare/options.json           what the values depend on; a restart must match it
    OUT/_prepare/work/<video>.npz|.json per-video arrays + done marker (ok, or skipped + reason)
    OUT/_prepare/hosts/host-H-of-N/     a host's slice: encoded.json, its shards, written.json

Stages, each skipped when its output exists (so rerunning the same command resumes, and a
finished video is never redone):
1. every host processes its slice of the sorted video list into the work cache (expensive);
2. once all hosts have finished 1, every host writes the records of its own slice into its own
   shard files, in sorted video order, with global video indices (known once all hosts are done);
3. host 0, once all hosts have finished 2, renames the shards into one TFDS dataset and writes
   the video table and TFDS metadata.
Between stages a host waits for the others by polling the shared output folder (`wait=False`
returns instead; rerun to continue). Nothing depends on timing, batch composition or the number
of hosts beyond shard boundaries: the records and their order are those of a one-host run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Sequence

import numpy as np

from data_pipelines import dataset_writer
from data_pipelines.video_arrays import PrepareOptions, Tools, frame_pngs, process_video
from keyface_jax.data import tfds_io
from keyface_jax.data.schema import FPS, VIDEO_TABLE, VideoEntry
from keyface_jax.media.errors import MediaError
from keyface_jax.media.video_list import VideoItem

STOP_AFTER_ENV = "KEYFACE_PREPARE_STOP_AFTER"   # test hook: raise after N videos of a run


class PrepareInterrupted(RuntimeError):
    """Raised by the STOP_AFTER_ENV hook (a deterministic stand-in for a crash)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How to run (does not change the values)."""

    output: str
    name: str = tfds_io.DATASET_NAME
    num_hosts: int = 1
    host_index: int = 0
    workers: int = 1
    batch_size: int = 8
    shard_mb: float = 512.0
    wait: bool = True
    poll_s: float = 10.0
    timeout_s: float = 7 * 24 * 3600.0
    skip_failed: bool = False
    progress: bool = True
    work_dir: str = ""


def _stem(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def _list_digest(items: Sequence[VideoItem]) -> str:
    text = "\n".join(f"{i.name}\t{os.path.abspath(i.path)}\t{i.group}\t{i.split}" for i in items)
    return hashlib.sha1(text.encode()).hexdigest()


class Workspace:
    """Paths of the work area and atomic reads/writes of its markers."""

    def __init__(self, run: RunConfig):
        self.output = run.output
        self.root = run.work_dir or os.path.join(run.output, "_prepare")
        self.work = os.path.join(self.root, "work")
        self.run = run
        os.makedirs(self.work, exist_ok=True)

    def host_dir(self, index: int) -> str:
        path = os.path.join(self.root, "hosts",
                            f"host-{index:05d}-of-{self.run.num_hosts:05d}")
        os.makedirs(path, exist_ok=True)
        return path

    def marker(self, item: VideoItem) -> str:
        return os.path.join(self.work, _stem(item.name) + ".json")

    def arrays(self, item: VideoItem) -> str:
        return os.path.join(self.work, _stem(item.name) + ".npz")

    def read_marker(self, item: VideoItem) -> dict | None:
        path = self.marker(item)
        return dataset_writer.read_json(path) if os.path.exists(path) else None


def host_slice(items: Sequence[VideoItem], num_hosts: int, host_index: int) -> list[VideoItem]:
    """Host `host_index`'s contiguous share of the sorted list: concatenating the hosts' slices in
    host order gives back the list, so a multi-host dataset has the single-host record order."""
    if not 0 <= host_index < num_hosts:
        raise ValueError(f"host_index {host_index} is not in [0, {num_hosts})")
    n = len(items)
    return list(items[host_index * n // num_hosts:(host_index + 1) * n // num_hosts])


PATHS_KEY = "paths_from_workspace"   # options.json: the options' local paths, relative to it


def _local_paths(record: dict) -> dict:
    """The options whose values are absolute local paths (inputs such as the VAE export)."""
    return {k: v for k, v in record["options"].items() if isinstance(v, str) and os.path.isabs(v)}


def _without_paths(record: dict) -> dict:
    paths = _local_paths(record)
    options = {k: v for k, v in record["options"].items() if k not in paths}
    return dict({k: v for k, v in record.items() if k != PATHS_KEY}, options=options)


def check_options(ws: Workspace, record: dict) -> None:
    """Stores the options on the first run; a later run with other values is refused (its
    cache would mix two datasets). Input paths match either as written (the dataset folder moved
    alone) or relative to the work area (the dataset moved together with its inputs, e.g. a
    whole demo output folder)."""
    path = os.path.join(ws.root, "options.json")
    record = json.loads(json.dumps(record))  # tuples → lists, as read back
    root = os.path.realpath(ws.root)
    record[PATHS_KEY] = {k: os.path.relpath(v, root) for k, v in _local_paths(record).items()}
    if not os.path.exists(path):
        dataset_writer.write_json(path, record)
        return
    old = dataset_writer.read_json(path)
    if old == record:
        return
    if _without_paths(old) == _without_paths(record) and old.get(PATHS_KEY) == record[PATHS_KEY]:
        dataset_writer.write_json(path, record)   # moved with its inputs: record where they are now
        return
    if {k: v for k, v in old.items() if k != PATHS_KEY} == \
            {k: v for k, v in record.items() if k != PATHS_KEY}:
        return   # the dataset folder moved, its inputs did not
    flat = lambda d: {f"{k}.{i}" if isinstance(v, dict) else k: (w if isinstance(v, dict) else v)
                      for k, v in d.items()
                      for i, w in (v.items() if isinstance(v, dict) else [(None, v)])}
    before, now = flat(old), flat(record)
    diff = [f"{k}: {before.get(k)!r} then, {now.get(k)!r} now"
            for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k) and not k.startswith(PATHS_KEY)]
    raise ValueError(f"{ws.root} was prepared with other options ({'; '.join(diff)}): "
                     "use another --output (or delete it) to prepare with new ones")


def run_one(item: VideoItem, opts: PrepareOptions, tools: Tools, ws: Workspace) -> dict:
    """Processes one video into the work cache. Bad inputs get a 'skipped' marker; unexpected
    errors are returned as 'failed' without a marker, so a restart retries them."""
    base = dict(name=item.name, path=item.path, group=item.group, split=item.split)
    try:
        arrays, meta = process_video(item, opts, tools)
    except MediaError as e:
        marker = dict(base, status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 (reported, retried on the next run)
        return dict(base, status="failed", reason=f"{type(e).__name__}: {e}")
    else:
        tmp = ws.arrays(item) + f".tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, ws.arrays(item))
        marker = dict(base, status="ok", **meta)
    dataset_writer.write_json(ws.marker(item), marker)
    return marker


_WORKER: dict = {}


def _worker_init(run: RunConfig, opts: PrepareOptions, worker_args: tuple):
    from data_pipelines.tools import build_tools
    _WORKER["opts"] = opts
    _WORKER["tools"] = build_tools(opts, *worker_args)
    _WORKER["ws"] = Workspace(run)


def _worker_run(item):
    return run_one(item, _WORKER["opts"], _WORKER["tools"], _WORKER["ws"])


def encode_stage(items: Sequence[VideoItem], opts: PrepareOptions, ws: Workspace, tools_factory,
                 worker_args: tuple | None) -> list[dict]:
    """Stage 1 for one host's items; returns this run's failures."""
    pending = [i for i in items if ws.read_marker(i) is None]
    if not pending:
        return []
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    failures, frames, start = [], 0, time.time()
    bar = None
    if ws.run.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(pending), unit="video", desc=f"host {ws.run.host_index}",
                   dynamic_ncols=True)

    def account(marker, count):
        nonlocal frames
        if marker["status"] == "failed":
            failures.append(marker)
        frames += marker.get("num_frames", 0) if marker["status"] == "ok" else 0
        count[marker["status"]] = count.get(marker["status"], 0) + 1
        count["done"] += 1
        if bar is not None:
            bar.set_postfix(frames_per_s=f"{frames / max(time.time() - start, 1e-9):.1f}",
                            skipped=count["skipped"], refresh=False)
            bar.update(1)
        if stop_after and count["done"] >= stop_after:
            raise PrepareInterrupted(f"{STOP_AFTER_ENV}={stop_after}: stopped after "
                                     f"{count['done']} videos")

    count = {"done": 0, "skipped": 0}
    try:
        if ws.run.workers <= 1 or worker_args is None:
            tools = tools_factory()
            for item in pending:
                account(run_one(item, opts, tools, ws), count)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                    ws.run.workers, mp_context=context, initializer=_worker_init,
                    initargs=(ws.run, opts, worker_args)) as pool:
                try:
                    for marker in pool.map(_worker_run, pending):
                        account(marker, count)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        if bar is not None:
            bar.close()
    return failures


def _wait_for(paths: Sequence[str], what: str, run: RunConfig, check=None) -> bool:
    """True once every path exists (and check(path) holds); False at once when not waiting."""
    deadline = time.time() + run.timeout_s
    while True:
        missing = [p for p in paths if not (os.path.exists(p) and (check is None or check(p)))]
        if not missing:
            return True
        if not run.wait:
            return False
        if time.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what}: {missing[:3]}")
        time.sleep(run.poll_s)


def global_table(markers: Sequence[dict]) -> tuple[list[VideoEntry], dict[str, int]]:
    """Video table (all hosts, sorted order, prepared videos only) and name → video_index.
    first_record counts the records of each split in that order."""
    table, index, next_record = [], {}, {}
    for m in markers:
        if m["status"] != "ok":
            continue
        first = next_record.get(m["split"], 0)
        next_record[m["split"]] = first + m["num_frames"]
        index[m["name"]] = len(table)
        table.append(VideoEntry(name=m["name"], source=m["path"],
                                source_fps=float(m["source_fps"]), num_frames=m["num_frames"],
                                first_record=first, group=m["group"], split=m["split"]))
    return table, index


def write_stage(items: Sequence[VideoItem], ws: Workspace, index: dict[str, int], features,
                host_dir: str) -> dict[str, list[dict]]:
    """Stage 2: this host's records, sorted video order, one shard sequence per split."""
    for f in os.listdir(host_dir):  # leftovers of an interrupted write
        if not f.endswith(".json"):
            os.remove(os.path.join(host_dir, f))
    serializer = features.serialize_example
    max_bytes = int(ws.run.shard_mb * 2**20)
    writers: dict[str, dataset_writer.ShardWriter] = {}
    for item in items:
        if item.name not in index:
            continue
        with np.load(ws.arrays(item)) as data:
            arrays = {k: data[k] for k in data.files}
        pngs = frame_pngs(arrays)
        writer = writers.setdefault(item.split,
                                    dataset_writer.ShardWriter(host_dir, item.split, max_bytes))
        for record in dataset_writer.frame_records(index[item.name], arrays, pngs):
            writer.write(serializer(record))
    return {split: [dataclasses.asdict(s) for s in w.close()] for split, w in writers.items()}


def _summary(markers: Sequence[dict], extra: dict) -> dict:
    ok = [m for m in markers if m["status"] == "ok"]
    skipped = [dict(file=m["path"], name=m["name"], reason=m["reason"])
               for m in markers if m["status"] == "skipped"]
    reasons: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return dict(extra, videos=len(markers), processed=len(ok), skipped=len(skipped),
                frames=sum(m["num_frames"] for m in ok), skipped_videos=skipped,
                skip_reasons=reasons)


def prepare(items: Sequence[VideoItem], opts: PrepareOptions, run: RunConfig, *, tools_factory,
            dataset: dict, worker_args: tuple | None = None) -> dict:
    """Runs the stages this host can run now; returns a summary dict with a `status` of
    'done' (dataset complete), 'waiting' (wait=False and other hosts are not there yet),
    'host done' (a host > 0 finished its part) or 'failed' (unexpected errors; rerun retries).

    `tools_factory()` builds the processing tools (called only when a video needs processing);
    with run.workers > 1, each worker process builds its own with
    `data_pipelines.tools.build_tools(opts, *worker_args)`; `dataset` holds the feature shapes
    (latent_shape, audio_dim, frame_shape) and goes into options.json and the TFDS metadata."""
    items = sorted(items)
    if not items:
        raise ValueError("no videos to prepare")
    ws = Workspace(run)
    check_options(ws, dict(options=dataclasses.asdict(opts), dataset=dataset, name=run.name))
    mine = host_slice(items, run.num_hosts, run.host_index)
    digest = _list_digest(items)
    start = time.time()

    failures = encode_stage(mine, opts, ws, tools_factory, worker_args)
    if failures and run.skip_failed:
        for f in failures:
            item = next(i for i in mine if i.name == f["name"])
            dataset_writer.write_json(ws.marker(item), dict(f, status="skipped",
                                                        reason=f"error: {f['reason']}"))
        failures = []
    host_dir = ws.host_dir(run.host_index)
    # the list decides path, group and split (a marker may predate a regrouped list)
    markers = [m and dict(m, path=i.path, group=i.group, split=i.split)
               for i, m in ((i, ws.read_marker(i)) for i in mine)]
    info = dict(host=run.host_index, num_hosts=run.num_hosts, seconds=round(time.time() - start, 2))
    if failures:
        summary = _summary([m for m in markers if m], dict(info, status="failed",
                                                          failures=failures))
        dataset_writer.write_json(os.path.join(host_dir, "summary.json"), summary)
        return summary
    dataset_writer.write_json(os.path.join(host_dir, "encoded.json"),
                          dict(list_digest=digest, markers=markers))

    same_list = lambda p: dataset_writer.read_json(p).get("list_digest") == digest
    encoded = [os.path.join(ws.host_dir(h), "encoded.json") for h in range(run.num_hosts)]
    if not _wait_for(encoded, "the other hosts' videos", run, same_list):
        return _summary(markers, dict(info, status="waiting"))
    all_markers = [m for p in encoded for m in dataset_writer.read_json(p)["markers"]]
    table, index = global_table(all_markers)
    if not table:
        raise ValueError("no video could be prepared: "
                         + "; ".join(f"{m['name']}: {m.get('reason')}" for m in all_markers[:5]))

    features = tfds_io.frame_features(dataset["latent_shape"], dataset["audio_dim"],
                                      dataset.get("frame_shape"))
    written = os.path.join(host_dir, "written.json")
    if not (os.path.exists(written) and same_list(written)):
        host_shards = write_stage(mine, ws, index, features, host_dir)
        dataset_writer.write_json(written, dict(list_digest=digest, shards=host_shards))
    if run.host_index != 0:
        return _summary(markers, dict(info, status="host done"))

    written_all = [os.path.join(ws.host_dir(h), "written.json") for h in range(run.num_hosts)]
    if not _wait_for(written_all, "the other hosts' shards", run, same_list):
        return _summary(markers, dict(info, status="waiting"))
    host_shards = [dataset_writer.read_json(p)["shards"] for p in written_all]
    sizes = dataset_writer.merge_shards(run.output, run.name, host_shards,
                                    [ws.host_dir(h) for h in range(run.num_hosts)])
    rows = [dataclasses.asdict(e) for e in table]
    dataset_writer.write_json(os.path.join(run.output, VIDEO_TABLE), rows)
    dataset_writer.write_dataset_info(
        run.output, name=run.name, features=features, sizes=sizes,
        metadata=dict(videos=rows, prepare=dict(options=dataclasses.asdict(opts), **dataset)),
        description=f"KeyFace frame records: one per {FPS} fps frame (keyface_jax.data.schema).")
    summary = _summary(all_markers, dict(info, status="done", output=run.output,
                                         splits={s: sum(n for n, _ in v)
                                                 for s, v in sizes.items()}))
    dataset_writer.write_json(os.path.join(run.output, "summary.json"), summary)
    return summary


def format_summary(summary: dict, max_lines: int = 50) -> str:
    """The summary as printed at the end of a run."""
    head = (f"[{summary['status']}] host {summary['host']}/{summary['num_hosts']}: "
            f"{summary['processed']} of {summary['videos']} videos prepared "
            f"({summary['frames']} frames at {FPS} fps), {summary['skipped']} skipped, "
            f"{summary['seconds']} s")
    lines = [head]
    for s in summary["skipped_videos"][:max_lines]:
        lines.append(f"  skipped {s['file']}: {s['reason']}")
    for f in summary.get("failures", [])[:max_lines]:
        lines.append(f"  FAILED {f['path']}: {f['reason']} (rerun to retry)")
    if summary["status"] == "done":
        lines.append(f"dataset: {summary['output']} {summary['splits']}; "
                     f"summary: {os.path.join(summary['output'], 'summary.json')}")
    elif summary["status"] == "waiting":
        lines.append("other hosts are not done yet: rerun the same command to continue")
    return "\n".join(lines)
