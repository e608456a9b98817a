import contextlib
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# one synthetic-dataset cache for the whole test session: each setting is generated once, on first use
SYNTHETIC_CACHE = Path(tempfile.mkdtemp(prefix="dr_train_synthetic_"))

warnings.filterwarnings("ignore", message=".*CPU Autocast only supports.*")
warnings.filterwarnings("ignore", message=".*In CPU autocast, but the target dtype is not supported.*")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def small_config(tmp_path, **overrides):
    """A fast tiny-preset config for tests: overrides as 'section.option' -> value."""
    from dr_train.config import load_config

    items = {"model.preset": "tiny", "train.output_dir": str(tmp_path / "runs"), "train.max_steps": 8,
             "train.checkpoint_every": 4,
             "data.videos_per_relation": 6, "optim.warmup_steps": 2, "data.cache_dir": str(SYNTHETIC_CACHE)}
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture
def python_exe():
    return sys.executable


def make_run(cfg, relation_name: str, out_dir):
    """A RelationRun of one catalog relation on the tiny preset, reading the (cached) synthetic dataset."""
    from dr_train.catalog import load_catalog
    from dr_train.data.sources import resolve_dataset
    from dr_train.model import load_mochi
    from dr_train.trainer import RelationRun

    from dr_train.distributed import Dist

    relation = load_catalog()[relation_name]
    dataset = resolve_dataset(cfg, [relation])
    return RelationRun(cfg, load_mochi("tiny"), relation, out_dir, Dist(), dataset)


@pytest.fixture(scope="module")
def encoder():
    """The tiny preset's VAE + T5 encoder at the data tests' size (data_helpers.SIZE)."""
    from data_helpers import SIZE
    from dr_train.config import load_config
    from dr_train.data.sources import make_encoder
    return make_encoder(load_config(None, SIZE), "cpu")


@contextlib.contextmanager
def local_vlm_server(monkeypatch, handler, key: str):
    """A threaded HTTP server on 127.0.0.1 answering with `handler`, the VLM key `key` in the environment and the
    loopback exempt from proxies; yields (server, its /v1 base URL), shut down after."""
    from http.server import ThreadingHTTPServer

    monkeypatch.setenv("DR_TRAIN_VLM_API_KEY", key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
