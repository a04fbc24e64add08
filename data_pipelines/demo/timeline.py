"""One demo video's script: segments, the 16 kHz soundtrack, per-frame controls and emotion labels.

Segments tile [0, seconds): "silence", "speech", and in the "nsv" group at least one "laugh" or
"sigh". The controls are derived from the finished soundtrack, so lips follow what is heard:

- mouth opening = loudness of the frame's own audio span (dB mapped to 0…1, lightly smoothed);
  silence closes the mouth; spectral centroid widens it a little (front vowels, fricatives);
- laughter: mouth held open and wide between calls, smile, head bobbing with each call and
  rocking; sighs: small opening, lids half-lowered, head sinking with the exhale;
- head: smooth random drift (sum of slow sinusoids) scaled by arousal, plus a slight nod on
  loud speech; blinks: a Poisson process (about one per 3 s), 200 ms each;
- valence/arousal (25 fps): per-video baseline, pulled towards per-segment targets (speech:
  a random valence offset per turn, arousal follows loudness; laugh: (0.8, 0.7); sigh:
  (−0.5, −0.35)), zero-phase smoothed; the
  smile control follows valence, so labels and pixels agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import signal

from data_pipelines.demo import vocal
from data_pipelines.demo.face import FacePose
from data_pipelines.demo.sources import SpeechCorpus
from keyface_jax.data.schema import AUDIO_RATE, FPS

NSV_KINDS = ("laugh", "sigh")
SPEECH_RMS = 0.05          # speech is normalised to about −26 dBFS RMS


@dataclasses.dataclass
class Segment:
    kind: str                  # silence | speech | laugh | sigh
    start: float               # seconds
    end: float
    source: dict | None = None # speech: where it was cut from

    def as_dict(self) -> dict:
        out = dict(kind=self.kind, start=round(self.start, 4), end=round(self.end, 4),
                   start_frame=int(round(self.start * FPS)), end_frame=int(round(self.end * FPS)))
        if self.source:
            out["source"] = self.source
        return out


def plan_segments(seconds: float, group: str, rng: np.random.Generator) -> list[Segment]:
    """Speech turns with pauses; an "nsv" video gets 1–2 laughs/sighs placed among them."""
    n_nsv = 0 if group == "speech" else 1 + int(seconds > 7 and rng.random() < 0.5)
    segs, t = [], 0.0
    lead = rng.uniform(0.12, 0.4) * min(1.0, seconds / 3.0)
    segs.append(Segment("silence", 0.0, min(lead, seconds)))
    t = segs[-1].end
    spoken = 0
    while t < seconds - 1e-6:
        remaining = seconds - t
        if remaining < 0.35 and not n_nsv:
            # too short for a turn: the video ends in silence
            if segs[-1].kind == "silence":
                segs[-1].end = seconds
            else:
                segs.append(Segment("silence", t, seconds))
            break
        nsv_len = rng.uniform(0.9, 1.5)
        force = n_nsv and remaining <= n_nsv * 1.6 + 0.2
        if n_nsv and (force or (spoken and rng.random() < 0.45)):
            kind = NSV_KINDS[int(rng.integers(0, 2))]
            segs.append(Segment(kind, t, min(t + nsv_len, seconds)))
            n_nsv -= 1
        else:
            # keep room for the NSVs still to come
            room = remaining - (n_nsv * 1.6 + 0.2 if n_nsv else 0.0)
            length = min(rng.uniform(0.8, 2.2), max(room, 0.4), remaining)
            segs.append(Segment("speech", t, t + length))
            spoken += 1
        t = segs[-1].end
        if t < seconds - 1e-6:
            segs.append(Segment("silence", t, min(t + rng.uniform(0.12, 0.4), seconds)))
            t = segs[-1].end
    return segs


def _fade(x: np.ndarray, ms: float = 12.0) -> np.ndarray:
    n = min(len(x) // 2, int(AUDIO_RATE * ms / 1000))
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def render_audio(segments: list[Segment], seconds: float, corpus: SpeechCorpus | None,
                 rng: np.random.Generator) -> np.ndarray:
    """The 16 kHz soundtrack; fills each speech segment's `source` with where it came from."""
    n = int(round(seconds * AUDIO_RATE))
    out = np.zeros(n, np.float64)
    # a faint room-noise floor, so silence is not digital zero
    out += 10 ** (-62 / 20) * signal.lfilter([1.0], [1.0, -0.9], rng.standard_normal(n)) * 0.3
    for seg in segments:
        a, b = int(round(seg.start * AUDIO_RATE)), int(round(seg.end * AUDIO_RATE))
        length = b - a
        if length <= 0 or seg.kind == "silence":
            continue
        if seg.kind == "speech":
            clip, seg.source = _speech_clip(corpus, length, rng)
        elif seg.kind == "laugh":
            clip = vocal.laughter(length / AUDIO_RATE, rng, f0=rng.uniform(250, 320))
        else:
            clip = vocal.sigh(length / AUDIO_RATE, rng, f0=rng.uniform(180, 220))
        out[a:b] += _fade(clip[:length].astype(np.float64))
    if corpus is not None and corpus.bandwidth < 0.45 * AUDIO_RATE:
        # the recording channel: what is not in the speech is not in the laughs either
        sos = signal.butter(10, corpus.bandwidth, fs=AUDIO_RATE, output="sos")
        out = signal.sosfiltfilt(sos, out)
    return np.clip(out, -1, 1).astype(np.float32)


def _speech_clip(corpus: SpeechCorpus | None, length: int, rng: np.random.Generator):
    seconds = length / AUDIO_RATE
    if corpus is None:
        return vocal.babble(seconds, rng, level=SPEECH_RMS), {"corpus": "babble"}
    spans = corpus.spans(min(seconds, 1.0))
    i, lo, hi = spans[int(rng.integers(0, len(spans)))]
    wav = corpus.waveforms[i]
    start = rng.uniform(lo, max(lo, min(hi, len(wav) / AUDIO_RATE) - seconds))
    a = int(start * AUDIO_RATE)
    clip = wav[a:a + length].astype(np.float64)
    clip = normalise_speech_level(np.pad(clip, (0, length - len(clip))))
    return clip, {"corpus": corpus.name, "file": int(i), "start": round(start, 4),
                  "end": round(start + seconds, 4)}


def normalise_speech_level(clip: np.ndarray, level: float = SPEECH_RMS) -> np.ndarray:
    """`clip` scaled so the RMS of its voiced 20 ms frames (those above a quarter of the loudest
    frame's RMS) is `level`: speech level without counting the pauses."""
    clip = np.asarray(clip, np.float64)
    hop = AUDIO_RATE // 50
    frames = clip[:len(clip) // hop * hop].reshape(-1, hop)
    loud = np.sqrt(np.mean(frames ** 2, axis=1))
    ref = np.sqrt(np.mean(loud[loud > 0.25 * loud.max()] ** 2)) if loud.size and loud.max() > 0 else 1.0
    return clip * (level / max(ref, 1e-6))


def frame_audio_stats(wav: np.ndarray, fps: float, num_frames: int):
    """Per video frame: RMS level (dB) and spectral centroid (Hz) of the frame's own span."""
    edges = np.round(np.arange(num_frames + 1) * AUDIO_RATE / fps).astype(int)
    db, centroid = np.zeros(num_frames), np.zeros(num_frames)
    freqs = np.fft.rfftfreq(1024, 1 / AUDIO_RATE)
    for i in range(num_frames):
        span = wav[edges[i]:edges[i + 1]].astype(np.float64)
        if span.size == 0:
            db[i] = -120.0
            continue
        db[i] = 10 * np.log10(np.mean(span ** 2) + 1e-12)
        mag = np.abs(np.fft.rfft(span * np.hanning(span.size), 1024))
        centroid[i] = (freqs * mag).sum() / (mag.sum() + 1e-12)
    return db, centroid


def _segment_mask(segments, kind: str, times: np.ndarray) -> np.ndarray:
    mask = np.zeros(times.shape, bool)
    for s in segments:
        if s.kind == kind:
            mask |= (times >= s.start) & (times < s.end)
    return mask


def _smooth_mask(mask: np.ndarray, fps: float, seconds: float = 0.15) -> np.ndarray:
    k = max(1, int(round(seconds * fps)))
    kernel = np.hanning(2 * k + 1)
    return np.convolve(mask.astype(np.float64), kernel / kernel.sum(), mode="same")


def emotion_track(segments, db25: np.ndarray, rng: np.random.Generator):
    """Valence and arousal per 25 fps frame, in [−1, 1]."""
    n = db25.size
    times = (np.arange(n) + 0.5) / FPS
    v0, a0 = rng.uniform(-0.2, 0.5), rng.uniform(-0.15, 0.3)
    loud = np.clip((db25 + 45) / 25, 0, 1)
    valence = np.full(n, v0)
    for seg in segments:          # each speech turn has its own mood
        if seg.kind == "speech":
            valence[(times >= seg.start) & (times < seg.end)] += rng.uniform(-0.3, 0.3)
    arousal = a0 - 0.1 + 0.3 * loud
    for kind, (v, a) in {"laugh": (0.8, 0.7), "sigh": (-0.5, -0.35)}.items():
        m = _smooth_mask(_segment_mask(segments, kind, times), FPS, 0.3)
        valence = (1 - m) * valence + m * v
        arousal = (1 - m) * arousal + m * a
    if n > 12:
        b, a = signal.butter(2, 1.2 / (FPS / 2))
        valence, arousal = signal.filtfilt(b, a, valence), signal.filtfilt(b, a, arousal)
    return (np.clip(valence, -1, 1).astype(np.float32), np.clip(arousal, -1, 1).astype(np.float32))


def _drift(rng: np.random.Generator, times: np.ndarray, amplitude: float) -> np.ndarray:
    out = np.zeros_like(times)
    for _ in range(3):
        f = rng.uniform(0.08, 0.5)
        out += np.sin(2 * np.pi * f * times + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.4, 1.0)
    return amplitude * out / 2.1


def _blinks(rng: np.random.Generator, times: np.ndarray, seconds: float) -> np.ndarray:
    out = np.zeros_like(times)
    t = rng.uniform(0.3, 2.5)
    while t < seconds:
        # 80 ms closing, 40 ms closed, 120 ms opening
        u = times - t
        prof = np.where(u < 0.08, u / 0.08, np.where(u < 0.12, 1.0, 1 - (u - 0.12) / 0.12))
        out = np.maximum(out, np.where((u >= 0) & (u < 0.24), np.clip(prof, 0, 1), 0.0))
        t += 0.3 + rng.exponential(2.8)
    return out


def frame_controls(segments, wav: np.ndarray, fps: float, num_frames: int,
                   valence25: np.ndarray, arousal25: np.ndarray,
                   rng: np.random.Generator, head_motion: float = 1.0) -> list[FacePose]:
    """One `FacePose` per video frame (see the module docstring). `head_motion` scales the
    random head drift (rotation, shifts, scale); the motion tied to laughs, sighs and loud
    speech is kept. The random draws do not depend on it, so only the drift changes."""
    seconds = num_frames / fps
    times = (np.arange(num_frames) + 0.5) / fps
    db, centroid = frame_audio_stats(wav, fps, num_frames)
    open_ = np.clip((db + 44.0) / 26.0, 0, 1) ** 1.1
    open_ = np.convolve(np.pad(open_, 1, mode="edge"), [0.2, 0.6, 0.2], mode="valid")
    wide = 0.5 * np.clip((centroid - 1500) / 2500, 0, 1) * (open_ > 0.05)

    t25 = (np.arange(valence25.size) + 0.5) / FPS
    valence = np.interp(times, t25, valence25)
    arousal = np.interp(times, t25, arousal25)

    laugh = _segment_mask(segments, "laugh", times)
    sigh = _segment_mask(segments, "sigh", times)
    laugh_s, sigh_s = _smooth_mask(laugh, fps), _smooth_mask(sigh, fps, 0.25)
    open_ = np.where(laugh, np.maximum(open_, 0.4), open_)
    open_ = np.where(sigh, 0.5 * open_, open_)
    wide = (1 - laugh_s) * wide + laugh_s * 0.9
    call = np.clip((db + 40) / 20, 0, 1) * laugh      # the loudness of each "ha"
    sigh_env = np.clip((db + 50) / 25, 0, 1) * sigh_s

    motion = head_motion * (1.0 + 0.6 * np.clip(arousal, -0.5, 1.0))
    rotation = _drift(rng, times, 2.5) * motion + 2.0 * laugh_s * np.sin(2 * np.pi * 1.3 * times)
    shift_x = _drift(rng, times, 0.012) * motion
    shift_y = (_drift(rng, times, 0.01) * motion + 0.004 * open_ * (1 - laugh_s)
               - 0.012 * call + 0.015 * sigh_env)
    scale = 1.0 + _drift(rng, times, 0.012) * head_motion
    blink = np.maximum(_blinks(rng, times, seconds), 0.45 * sigh_env + 0.25 * laugh_s)
    smile = np.clip(1.2 * valence, -1, 1)
    return [FacePose(rotation=float(rotation[i]), shift_x=float(shift_x[i]),
                     shift_y=float(shift_y[i]), scale=float(scale[i]),
                     mouth_open=float(open_[i]), mouth_wide=float(wide[i]),
                     smile=float(smile[i]), blink=float(min(blink[i], 1.0)))
            for i in range(num_frames)]
