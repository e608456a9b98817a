"""Prepare training data: `python launch/prepare.py ingest VIDEOS --out DATASET`, `synthetic`, `verify`, `sheet`
(see --help)."""
import sys

from dr_train.cli import one_line_errors
from dr_train.data.cli import main

if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
