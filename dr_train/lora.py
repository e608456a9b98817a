"""Kept importable for existing code: the relation LoRA triplet lives in `dr_train.method.triplet` (this name is that module)."""
import sys

from dr_train.method import triplet as _module

sys.modules[__name__] = _module
