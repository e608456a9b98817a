"""Packaging for the DreamRelation training system.

CPU machines: `pip install torch==2.13.0` first, then `pip install -c constraints.txt -e .[test]`
(the Makefile does both). GPU machines: keep the torch you have and install without the constraints file.
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.4",
    "diffusers>=0.32,<0.43",
    "peft>=0.14,<0.22",
    "transformers>=4.46,<6",
    "accelerate>=1.0,<2",
    "safetensors>=0.4.5,<0.9",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "pillow>=10.0",
    "av>=12.0",
    "sentencepiece>=0.2",
    "tokenizers>=0.20",
    # Hugging Face `datasets` is required so that the repository's data folder `datasets/` can never be
    # picked up as an (empty) namespace package by libraries that probe `import datasets`.
    "datasets>=3.0",
]
EXTRAS = {
    "kernels": ["triton>=3.0"],
    "data": ["webdataset>=0.2.100,<1.1"],
    "distributed": ["deepspeed>=0.16,<0.20"],
    "ray": ["ray[train]>=2.40,<2.61"],
    "gpu": ["nvidia-ml-py>=12.0", "flash-attn>=2.6", "nvidia-dali-cuda120>=1.40"],
    "wandb": ["wandb>=0.17"],
    "test": ["pytest>=8.0", "pytest-timeout>=2.3", "wandb>=0.17"],     # wandb: its offline mode is tested
}
EXTRAS["cpu"] = EXTRAS["kernels"] + EXTRAS["data"] + EXTRAS["distributed"] + EXTRAS["ray"] + ["nvidia-ml-py>=12.0"]

setup(
    name="dr-train",
    version="0.1.0",
    description="Distributed training of relation LoRA triplets on Mochi-1 (DreamRelation)",
    python_requires=">=3.10",
    packages=find_packages(include=["dr_train", "dr_train.*", "kernels", "kernels.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
