"""Kept importable for existing code: hybrid mask training lives in `dr_train.method.hybrid_mask_training` (this name is that module)."""
import sys

from dr_train.method import hybrid_mask_training as _module

sys.modules[__name__] = _module
