"""Generate videos with trained relations.

One video:      python launch/generate.py --prompt "A dog is shaking hands with a cat." --lora runs/x/handshaking/lora
A run's set:    python launch/generate.py --run runs/x [--relations a,b] [--num-prompts 3] [--seeds 0,1] [--no-base]
(see --help and docs/evaluation.md).
"""
import sys

from dr_train.generate import main

if __name__ == "__main__":
    sys.exit(main())
