"""The main job on its built-in default: train relations on the synth base, generate and judge unseen prompts, write
<output-dir>/report.html (`make demo`; see --help)."""
import sys

from dr_train.cli import one_line_errors
from dr_train.demo import main

if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
