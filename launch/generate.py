"""Generate a video with a trained relation: `python launch/generate.py --prompt "..." --lora runs/x/handshaking/lora`."""
import sys

from dr_train.generate import main

if __name__ == "__main__":
    sys.exit(main())
