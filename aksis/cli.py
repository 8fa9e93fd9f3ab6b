"""The `aksis` command (also `python -m aksis.cli`): one subcommand per task, each a thin wrapper
over the library. Subcommands import their modules lazily so `aksis --help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aksis import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def cmd_tokenize(args: argparse.Namespace) -> None:
    from aksis.tokenizer import Tokenizer, TokenizerError

    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"cannot read {args.file}: {err}") from err
    else:
        text = args.text
    try:
        tokenizer = Tokenizer.from_name(args.tokenizer)
    except TokenizerError as err:
        raise CLIError(str(err)) from err
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]
    print(f"tokenizer: {tokenizer.name} ({tokenizer.kind}, {tokenizer.vocab_size} tokens)")
    print(f"tokens: {pieces!r}")
    print(f"ids: {ids}")
    print(f"count: {len(ids)}")


def cmd_train_model(args: argparse.Namespace) -> None:
    import logging

    from aksis.config import TrainConfig
    from aksis.trainer import TrainingError, train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("aksis").setLevel(logging.INFO)
    try:
        config = TrainConfig.from_args(args)
    except ValueError as err:
        raise CLIError(str(err)) from err
    try:
        result = train(config)
    except TrainingError as err:
        raise CLIError(str(err)) from err
    summary = f"{result.steps} steps, {result.tokens:,} tokens ({result.stopped})"
    if result.best_val_loss is not None:
        summary += f"; best validation loss {result.best_val_loss:.4f}: {result.best_checkpoint}"
    if result.stopped == "interrupted":
        summary += f"; continue with --resume (latest checkpoint: {result.last_checkpoint})"
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, once, from the main process
        print(summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aksis", description="Train, share and use small GPT language models.")
    parser.add_argument("--version", action="version", version=f"aksis {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tok = commands.add_parser("tokenize", help="show the tokens and ids of a text")
    source = tok.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to tokenize")
    source.add_argument("--file", help="a UTF-8 text file to tokenize")
    tok.add_argument(
        "--tokenizer",
        default="cl100k_base",
        help="a tiktoken encoding (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base), 'byte', "
        "or the path of a tokenizer.json or checkpoint folder (default: cl100k_base, available offline)",
    )
    tok.set_defaults(func=cmd_tokenize)

    from aksis.config import TrainConfig  # plain dataclasses: cheap to import

    train = commands.add_parser(
        "train-model",
        help="train a model (for several processes or GPUs: accelerate launch training/train.py)",
        description="Train a model. Options come from the defaults, then --config FILE, then the flags given.",
    )
    TrainConfig.add_arguments(train)
    train.set_defaults(func=cmd_train_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`training/train.py`: the options of `aksis train-model`, without the subcommand."""
    from aksis.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an aksis model; run it with `accelerate launch` for several processes or GPUs. Options "
        "come from the defaults, then --config FILE, then the flags given.",
    )
    TrainConfig.add_arguments(parser)
    parser.set_defaults(func=cmd_train_model)
    return _run(parser, argv)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except CLIError as err:
        command = getattr(args, "command", None)
        print(f"{parser.prog}{' ' + command if command else ''}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
