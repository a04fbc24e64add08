"""Offline demo dataset: talking-face videos made from material that ships inside packages.

Real face photos (`photos.py`: skimage's astronaut, matplotlib's Grace Hopper, the Obama and
Biden photos of the face_recognition sdist) are animated by image warping: jaw opening driven by
the loudness of real recorded speech (pyannote.audio's sample.wav or pysptk's CMU ARCTIC clip,
else procedural babble), lip widening and smile, blinks, smooth head motion, and procedural
laughter and sighs with matching motion (wide open mouth + bobbing head; half-closed lids +
sinking head). Video i shows face i mod len(faces); each face is framed by a face-aligned crop
placed from its dlib landmarks (`--crop_scale`; the astronaut alone keeps its hand-placed rig by
default). Build it with

    python -m data_pipelines.demo.build --output DIR --num_videos N --seconds S --size 256 --seed 0 \
        [--faces astronaut,hopper,obama --crop_scale 3.6 --max_open 0.4 --photo_cache DIR]

`heldout.py` makes the held-out test speech (TTS, and the JFK recording of the pywhispercpp
sdist); `packages.py` fetches sdist files, `fetch.py` all the demo needs (`python -m data_pipelines.demo.fetch --cache DIR`).

Layout:

    DIR/manifest.json
    DIR/videos/<name>.mp4               H.264 yuv420p, `fps` (25 default, 30 allowed), mono AAC
                                        (or PCM) audio at `audio_rate` (48 kHz default)
    DIR/emotions/<name>.json           per-frame valence/arousal at 25 fps (the reference keeps
                                        the same values in emotions/<name>.pt)
    DIR/faces/<face>.png                each face at rest (mouth closed, eyes open), framed as in
                                        the videos: identity inputs and references

Emotion file (`format: "keyface-emotion/1"`), JSON:

    {"format": "keyface-emotion/1",
     "fps": 25,                       always 25: one value per 25 fps frame, whatever the video fps
     "num_frames": N,                 round(duration · 25)
     "valence": [N floats in [-1, 1]],
     "arousal": [N floats in [-1, 1]]}

Frame i covers [i/25, (i+1)/25) s of the video. A reader should accept a video whose 25 fps
frame count differs by one from `num_frames` (pad by repeating the last value / trim).

Manifest (`format: "keyface-demo/1"`), JSON: dataset-wide `seed, fps, size, seconds, audio_rate,
emotion_fps, face_source, faces, crop_scale, max_open, head_motion, mouth_box, speech_source,
speech_files`, and `videos`, one entry per video:

    name                 "demo_0000"
    face                 which face it shows (`photos.ALL_FACES`)
    mouth_box            [top, bottom, left, right], fractions of the frame, that the face's lips
                         move in (`FaceAnimator.mouth_box`); the dataset-wide one holds them all
    video, emotion       paths relative to DIR
    group                "speech" (speech and pauses only) or "nsv" (also ≥ 1 laugh or sigh)
    fps, num_frames      of the mp4; num_frames_25fps = round(duration · 25)
    duration             seconds (= num_frames / fps; the audio track has the same length)
    audio_rate, width, height
    segments             the whole timeline, in order, tiling [0, duration):
                         {kind: silence|speech|laugh|sigh, start, end (s),
                          start_frame, end_frame (25 fps frame indices, half-open),
                          source (speech only: corpus, file, start, end in the recording)}
    nsv                  the laugh/sigh segments only (same records)
"""

EMOTION_FORMAT = "keyface-emotion/1"
MANIFEST_FORMAT = "keyface-demo/1"
