"""Long-video planning (every length 1..2000) and emotion tracks."""

import json

import numpy as np
import pytest

from keyface_jax.generation.emotion import EMOTIONS, emotion_track
from keyface_jax.generation.plan import REAL_SLOTS, SLOTS, STRIDE, ClipPlan, frame_sources

LENGTHS = range(1, 2001)


@pytest.mark.parametrize("chunk", range(0, 2000, 250))
def test_every_frame_is_produced_exactly_once_and_aligned(chunk):
    for num_frames in range(chunk + 1, chunk + 251):
        plan = ClipPlan(num_frames)
        sources = frame_sources(plan)
        assert len(sources) == num_frames                       # output length = audio frames
        # frames in order, each once: segment j offset m is frame 13j + m
        produced = [13 * j + m for _, j, m in sources]
        assert produced == list(range(num_frames))
        positions = plan.keyframe_positions
        assert positions[-1] >= num_frames - 1 and (len(positions) == 1 or positions[-2] < num_frames - 1)
        seen = []
        for item in range(plan.num_keyframe_items):
            rows, index = plan.keyframe_item(item)
            assert rows.shape == index.shape == (SLOTS,)
            assert index[0] == -1 and rows[0] == 0               # slot 0: the dummy, frame-0 audio
            real = index >= 0
            assert real.any()                                    # no all-dummy item (§9.3)
            # keyframe ↔ audio row: a keyframe's own frame (clamped past the end)
            np.testing.assert_array_equal(rows[real], np.minimum(positions[index[real]], num_frames - 1))
            assert (index[real] == index[real][0] + np.arange(real.sum())).all()
            seen.extend(index[real].tolist())
        assert seen == list(range(len(positions)))               # each keyframe sampled once
        for j in range(plan.num_segments):
            rows = plan.segment_rows(j)
            np.testing.assert_array_equal(rows, np.minimum(13 * j + np.arange(SLOTS), num_frames - 1))


def test_small_cases_by_hand():
    assert ClipPlan(1).num_segments == 0 and list(ClipPlan(1).keyframe_positions) == [0]
    assert ClipPlan(14).num_segments == 1 and list(ClipPlan(14).keyframe_positions) == [0, 13]
    plan = ClipPlan(15)  # one frame past a segment: a second, mostly padded segment
    assert list(plan.keyframe_positions) == [0, 13, 26]
    assert list(plan.segment_frames(1)) == [13, 14]
    assert list(plan.segment_rows(1)) == [13] + [14] * 13
    # 14 keyframes fill one item (1 dummy + 13) and a second holds the 14th (no all-dummy item)
    plan = ClipPlan(13 * 13 + 1)
    assert len(plan.keyframe_positions) == 14 and plan.num_keyframe_items == 2
    rows, index = plan.keyframe_item(1)
    assert list(index) == [-1, 13] + [-1] * 12 and list(rows) == [0] + [169] * 13
    with pytest.raises(ValueError):
        ClipPlan(0)


def test_reference_slot_count_stays_thirteen_real_per_item():
    assert REAL_SLOTS == 13 and STRIDE == 13


def test_emotions_named_blended_file_and_intensity_once(tmp_path):
    np.testing.assert_allclose(emotion_track("happy", 5), np.tile([0.85, 0.75], (5, 1)), rtol=1e-6)
    blend = emotion_track("neutral,happy", 11)
    np.testing.assert_allclose(blend[0], [0, 0]) and np.testing.assert_allclose(blend[-1], [0.85, 0.75])
    np.testing.assert_allclose(blend[5], [0.425, 0.375], rtol=1e-6)
    # intensity is applied once (the reference's accentuate scaled twice), then clipped to [-1, 1]
    np.testing.assert_allclose(emotion_track("sad", 3, intensity=1.5)[0], [-1.0, -0.525], rtol=1e-6)
    np.testing.assert_allclose(emotion_track("calm", 3, intensity=1.5)[0], [0.975, -0.75], rtol=1e-6)
    values = np.stack([np.linspace(-1, 1, 9), np.zeros(9)], -1)
    np.save(tmp_path / "va.npy", values)
    np.testing.assert_allclose(emotion_track(str(tmp_path / "va.npy"), 10)[-1], [1, 0])  # 1 short: padded
    (tmp_path / "va.json").write_text(json.dumps(dict(valence=[0.1] * 10, arousal=[0.2] * 10)))
    np.testing.assert_allclose(emotion_track(str(tmp_path / "va.json"), 10), [[0.1, 0.2]] * 10, rtol=1e-6)
    (tmp_path / "va.csv").write_text("valence,arousal\n" + "0.3,-0.3\n" * 10)
    np.testing.assert_allclose(emotion_track(str(tmp_path / "va.csv"), 10), [[0.3, -0.3]] * 10, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown emotion"):
        emotion_track("grumpy", 4)
    with pytest.raises(ValueError, match="frames"):
        emotion_track(str(tmp_path / "va.npy"), 20)
    assert len(EMOTIONS) == 24
