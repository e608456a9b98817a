"""Pretraining the `synth` base (launch/pretrain_base.py): a Mochi-architecture stack learned on the synth world.

Stages, each resumable from its own folder under `run.out` (`loop.run_stage`):
    vae          the AutoencoderKLMochi on generic corpus clips                         vae.py
    corpus       the trained VAE's latent statistics, then the corpus encoded once,
                 and the frozen T5's embeddings of every corpus caption                  corpus.py
    transformer  the MochiTransformer3DModel with the trainer's rectified-flow objective  transformer.py
    decoder      the VAE decoder fine-tuned (encoder frozen), weighted on the subjects   vae.py
    export       the diffusers folder, its checks and model card, SHA256SUMS             export.py
`run(cfg, stages, minutes)` does as many as fit in `minutes` and returns whether all are done.
"""
from __future__ import annotations

STAGES = ("vae", "corpus", "transformer", "decoder", "export")
