"""Export a relation's LoRA from any training checkpoint, after the fact: diffusers and ComfyUI files with metadata
and a model card.

    python launch/export.py runs/x/handshaking                       # latest checkpoint -> runs/x/handshaking/lora
    python launch/export.py runs/x/handshaking --step 200            # -> runs/x/handshaking/lora-step-200
    python launch/export.py runs/x/handshaking --format comfyui --adapters relation,ffn --out /tmp/hs

(see --help and docs/export.md).
"""
import sys

from dr_train.export import main

if __name__ == "__main__":
    sys.exit(main())
