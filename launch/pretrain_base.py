"""Pretrain the synth base from a seed, in resumable chunks: `python launch/pretrain_base.py --minutes 60` (see
--help). Re-run the same command until it prints that every stage is done."""
import sys

from dr_train.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
