"""Evaluate checkpoints: `python evaluation/evaluate.py --checkpoint-path PATH_OR_HUB_ID [--compare OTHER ...]`.

The same as `aksis evaluate` (see `--help`): perplexity and bits per byte on held-out text, BLEU / ROUGE of
generations, a Markdown table on stdout and eval_results.json in each local checkpoint folder.
"""

import sys
from pathlib import Path

# Python puts this script's folder first on the import path, where this very file would shadow the `evaluate`
# library that the BLEU and ROUGE modules are loaded with.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from aksis.cli import main  # noqa: E402 - after the path is fixed

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
