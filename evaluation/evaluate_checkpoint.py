"""Evaluate checkpoints: `python evaluation/evaluate_checkpoint.py --checkpoint-path PATH_OR_HUB_ID [--compare ...]`.

The same as `aksis evaluate` (see `--help`): perplexity and bits per byte on held-out text, BLEU / ROUGE of
generations, a Markdown table on stdout and eval_results.json in each local checkpoint folder.
"""

import sys

from aksis.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
