import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

warnings.filterwarnings("ignore", message=".*CPU Autocast only supports.*")
warnings.filterwarnings("ignore", message=".*In CPU autocast, but the target dtype is not supported.*")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def small_config(tmp_path, **overrides):
    """A fast tiny-preset config for tests: overrides as 'section.option' -> value."""
    from dr_train.config import load_config

    items = {"train.output_dir": str(tmp_path / "runs"), "train.max_steps": 8, "train.checkpoint_every": 4,
             "data.videos_per_relation": 6, "optim.warmup_steps": 2}
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture
def python_exe():
    return sys.executable
