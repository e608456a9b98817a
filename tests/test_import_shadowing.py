"""The repo's top-level `datasets/` (data) and `kernels/` (our Triton package) must not change what
transformers and diffusers see when they probe for Hugging Face's `datasets` and `kernels` packages."""
import json
import os
import subprocess
import sys

from conftest import REPO

PROBE = r"""
import importlib.util, json
import transformers, diffusers
from transformers.utils import import_utils as tu
from diffusers.utils import import_utils as du
from transformers import T5Config, T5EncoderModel
from diffusers import MochiTransformer3DModel
import datasets
print(json.dumps({
    "tf_datasets": tu.is_datasets_available(), "tf_kernels": tu.is_kernels_available(),
    "df_kernels": du.is_kernels_available(),
    "datasets_file": getattr(datasets, "__file__", None), "datasets_has_Dataset": hasattr(datasets, "Dataset"),
}))
"""


def _probe(extra_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [extra_path, env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=extra_path or "/", env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_transformers_and_diffusers_behave_the_same_with_the_repo_on_sys_path():
    outside = _probe("")
    inside = _probe(str(REPO))
    assert inside == outside
    assert inside["datasets_has_Dataset"] and not inside["datasets_file"].startswith(str(REPO / "datasets") + os.sep)
    assert inside["tf_kernels"] is False and inside["df_kernels"] is False
