"""Video and audio I/O (PyAV), 25 fps / 16 kHz resampling and face crops.

- `video`: probe a file, stream its frames resampled to 25 fps, write mp4s (frames + audio).
- `audio`: decode a file's audio as 16 kHz mono float32, and align it to the video frames.
- `face_crop`: centre or face-detector crop boxes, temporally smoothed, and crop+resize.

Every decoding failure is raised as `MediaError` with a one-line reason that data preparation
reports as the reason a file was skipped.
"""

from keyface_jax.media.errors import MediaError

__all__ = ["MediaError"]
