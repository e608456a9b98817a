"""Train relation LoRA triplets: `python launch/train.py --relations handshaking,hugging` (see --help)."""
import sys

from dr_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
