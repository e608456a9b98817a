"""Training data: built-in synthetic relation clips and the stream the trainer consumes."""
from dr_train.data.stream import ClipStream
from dr_train.data.synthetic import LatentClip, render_clip, synthetic_relation_clips

__all__ = ["ClipStream", "LatentClip", "render_clip", "synthetic_relation_clips"]
