"""``python -m alignkit.tasks [OUT_DIR]``: rewrite the constraint prompt files (default: sample_data/)."""

import sys

from .prompts import write_sample_data

for path in write_sample_data(sys.argv[1] if len(sys.argv) > 1 else None):
    print(path)
