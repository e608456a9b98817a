"""Kept importable for existing code: the memory bank lives in `dr_train.method.memory_bank` (this name is that module)."""
import sys

from dr_train.method import memory_bank as _module

sys.modules[__name__] = _module
