"""Dataset preparation: folders of talking-face videos → TFDS ArrayRecord frame datasets.

    python -m data_pipelines.prepare --config configs/keyframe.py:tiny --videos DIR --output OUT
"""
