"""Where every output frame of a long clip comes from (spec §1.3, with the §9 bugs fixed).

A clip of F frames (its audio length at 25 fps) gets keyframes at positions 0, 13, 26, …, 13·J with
J = ⌈(F − 1)/13⌉, so the last keyframe reaches or passes frame F − 1; segment j interpolates the 12
frames between keyframes j and j + 1. Every output frame is produced exactly once: frame 13·j is
keyframe j, frame 13·j + m (1 ≤ m ≤ 12) is in-between m of segment j; positions at or past F exist
only as context for the tail and are cut.

Keyframes go to the keyframe model in items of 14 slots: slot 0 is a dummy carrying frame 0's
audio and emotion (training puts the identity frame there), slots 1..13 hold up to 13 real
keyframes, and a short last item is padded by repeating its last real slot. Fixes against the
reference:
  - §9.1: no "un-remove" of a removed slot at the tail, so the dummy never becomes a keyframe and
    keyframe ↔ audio pairing never shifts;
  - §9.3: items are cut from the real keyframes, so no item is all dummies;
  - the tail: the last segment is a full 14-frame segment whose out-of-range positions read the
    last audio row (as the reference pads), and its frames past F − 1 are dropped.
Audio/emotion rows for a position p are row min(p, F − 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

STRIDE = 13                   # frames between keyframes
SLOTS = 14                    # frames per network clip, both stages
REAL_SLOTS = SLOTS - 1        # real keyframes per keyframe item (slot 0 is the dummy)


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    num_frames: int

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"a clip needs at least one frame, got {self.num_frames}")

    @property
    def num_segments(self) -> int:
        return -(-(self.num_frames - 1) // STRIDE)

    @property
    def keyframe_positions(self) -> np.ndarray:
        """Video frame of each keyframe j = 0..J (the last may lie past the end)."""
        return np.arange(self.num_segments + 1) * STRIDE

    def row(self, positions) -> np.ndarray:
        """The audio/emotion row used at video positions (clamped to the last real frame)."""
        return np.minimum(np.asarray(positions), self.num_frames - 1)

    @property
    def num_keyframe_items(self) -> int:
        return -(-len(self.keyframe_positions) // REAL_SLOTS)

    def keyframe_item(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [14] of audio/emotion per slot, keyframe index [14] per slot: −1 for the dummy
        slot 0 and for padding). Slot s ≥ 1 of item i holds keyframe 13·i + s − 1."""
        if not 0 <= item < self.num_keyframe_items:
            raise IndexError(f"keyframe item {item} of {self.num_keyframe_items}")
        count = len(self.keyframe_positions)
        real = np.arange(item * REAL_SLOTS, min((item + 1) * REAL_SLOTS, count))
        padded = np.concatenate([real, np.full(REAL_SLOTS - len(real), real[-1])])
        rows = np.concatenate([[0], self.row(self.keyframe_positions[padded])])
        index = np.concatenate([[-1], real, np.full(REAL_SLOTS - len(real), -1)])
        return rows, index

    def segment_rows(self, segment: int) -> np.ndarray:
        """Audio rows [14] of segment j: positions 13·j … 13·j + 13, clamped."""
        if not 0 <= segment < self.num_segments:
            raise IndexError(f"segment {segment} of {self.num_segments}")
        return self.row(segment * STRIDE + np.arange(SLOTS))

    def segment_frames(self, segment: int) -> np.ndarray:
        """The output frames segment j's decoded chunk provides, in order: its first frame (the
        keyframe 13·j) and its 12 in-betweens; the chunk's last frame (the next keyframe) belongs to
        the next segment, except for the last segment, which also provides frame 13·J if < F."""
        start = segment * STRIDE
        last = segment == self.num_segments - 1
        frames = np.arange(start, start + STRIDE + int(last))
        return frames[frames < self.num_frames]


def frame_sources(plan: ClipPlan) -> list[tuple[str, int, int]]:
    """For each output frame: ("keyframe", j, 0) or ("segment", j, m). A single-frame clip is its
    keyframe 0; otherwise frames come from decoded segment chunks (a chunk's frame 0 is its first
    keyframe, with the shared boundary decoded from both neighbours and averaged)."""
    if plan.num_segments == 0:
        return [("keyframe", 0, 0)]
    out = []
    for j in range(plan.num_segments):
        for f in plan.segment_frames(j):
            out.append(("segment", j, int(f - j * STRIDE)))
    return out
