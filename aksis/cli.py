"""The `aksis` command (also `python -m aksis.cli`): one subcommand per task, each a thin wrapper
over the library. Subcommands import their modules lazily so `aksis --help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aksis import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def cmd_tokenize(args: argparse.Namespace) -> None:
    from aksis.hf_tokenizer import tokenizer_from_name
    from aksis.tokenizer import TokenizerError

    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"cannot read {args.file}: {err}") from err
    else:
        text = args.text
    try:
        tokenizer = tokenizer_from_name(args.tokenizer)
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
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch`, once, from the main process
        return
    print(summary)
    if result.push_errors:
        for error in result.push_errors:
            print(f"warning: {error}", file=sys.stderr)
        where = result.best_checkpoint or result.last_checkpoint
        raise CLIError(
            f"{len(result.push_errors)} push(es) to {config.hub_model_id} failed (above); the checkpoints are intact: "
            f"push again with `aksis push --checkpoint-path {where} --repo-id {config.hub_model_id}`"
        )


def cmd_load_data(args: argparse.Namespace) -> None:
    import itertools

    from aksis.blocks import PackedBlocks, build_data
    from aksis.config import IGNORE_INDEX
    from aksis.corpora import DataError

    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        data = build_data(
            args.dataset,
            block_size=args.max_length,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            text_column=args.text_column,
            streaming=args.streaming or None,
            val_fraction=args.val_fraction,
            data_format=args.data_format,
        )
    except DataError as err:
        raise CLIError(str(err)) from err
    tok = data.tokenizer
    print(
        f"dataset: {args.dataset} ({args.data_format}); tokenizer: {tok.name} ({tok.kind}, {tok.vocab_size:,} tokens)"
    )
    if not isinstance(data.train, PackedBlocks):
        print(f"train: streamed, packed on the fly into blocks of {args.max_length} tokens")
    else:
        print(f"train: {data.train_tokens:,} tokens in {len(data.train):,} blocks of {args.max_length} tokens")
    val = data.validation
    print(f"validation: {len(val.tokens):,} tokens in {len(val):,} blocks of {val.block_size} tokens")
    batch = list(itertools.islice(iter(data.train), args.batch_size))
    print(
        f"sample batch: {len(batch)} blocks" + (" ([[...]]: the tokens that carry loss)" if batch[0].dim() == 2 else "")
    )
    for i, block in enumerate(batch):
        if block.dim() == 1:  # text: inputs are block[:-1]
            text = tok.decode(block[:-1].tolist())
        else:  # chat: [ids; labels]; target t + 1 is trained when its label is not IGNORE_INDEX
            ids, trained = block[0, 1:].tolist(), (block[1, 1:] != IGNORE_INDEX).tolist()
            runs = itertools.groupby(zip(ids, trained, strict=True), key=lambda pair: pair[1])
            text = "".join(
                f"[[{tok.decode([t for t, _ in run])}]]" if is_trained else tok.decode([t for t, _ in run])
                for is_trained, run in runs
            )
        if len(text) > args.show_chars:
            text = text[: args.show_chars] + " …"
        print(f"--- block {i}\n{text}")


def cmd_push(args: argparse.Namespace) -> None:
    from aksis.checkpoint import CheckpointError, find_checkpoint
    from aksis.hub import HubError, push_checkpoint

    try:
        folder = find_checkpoint(args.checkpoint_path)  # a run folder: its best/ (else newest step-N/) checkpoint
    except CheckpointError as err:
        raise CLIError(f"{err}; nothing pushed") from err
    try:
        commit = push_checkpoint(
            folder,
            args.repo_id,
            branch=args.revision,
            tag=args.tag,
            move_tag=args.move_tag,
            private=args.private,
            license=args.license,
            commit_message=args.commit_message,
            with_training_state=args.with_training_state,
        )
    except HubError as err:
        raise CLIError(str(err)) from err
    tagged = f", tagged {args.tag}" if args.tag else ""
    print(f"pushed {folder} to {args.repo_id}@{args.revision or 'main'} (commit {commit[:12]}{tagged})")


def cmd_export(args: argparse.Namespace) -> None:
    from aksis.checkpoint import (
        CheckpointError,
        base_model_of,
        find_checkpoint,
        load_generation_config,
        load_gpt,
        load_tokenizer,
        save_checkpoint,
    )
    from aksis.gguf_format import GGUFError, export_gguf
    from aksis.quantize import quantization_of
    from aksis.transformers_format import expressible_family

    if args.outtype is not None and args.format != "gguf":
        raise CLIError("--outtype applies to --format gguf; a transformers checkpoint keeps the model's weights")
    output = Path(args.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise CLIError(f"--output {output} exists: choose another path, or add --overwrite")
    try:
        source = find_checkpoint(args.checkpoint_path)
        model, tokenizer = load_gpt(source), load_tokenizer(source)
        settings = load_generation_config(source)
    except CheckpointError as err:
        raise CLIError(f"{err}; nothing written") from err
    if (scheme := quantization_of(model)) != "none":
        raise CLIError(
            f"{source} holds {scheme} weights, which exports do not carry: export the full-precision checkpoint it "
            "was made from (for llama.cpp, --outtype q8_0 or q4_0 quantizes in its own formats); nothing written"
        )
    if args.format == "gguf":
        try:
            export_gguf(model, tokenizer, output, outtype=args.outtype or "f32", name=Path(str(source)).name)
        except (GGUFError, OSError) as err:
            raise CLIError(f"{err}; nothing written") from err
        print(f"wrote {output}: GGUF ({args.outtype or 'f32'}) for llama.cpp, Ollama and LM Studio")
        return
    family = expressible_family(model.config)
    if family is None:
        raise CLIError(
            f"no transformers family expresses {source} ({model.config.describe()}, {model.config.n_kv_head} key/value "
            "heads: transformers' GPT-2 has one per query head); nothing written"
        )
    try:
        base = base_model_of(source)
        save_checkpoint(model, output, tokenizer=tokenizer, generation_config=settings, base_model=base)
    except CheckpointError as err:
        raise CLIError(f"{err}; nothing written") from err
    print(
        f"wrote {output}: a transformers checkpoint ({family} family) that aksis reads too; in Python: "
        f"AutoModelForCausalLM.from_pretrained({str(output)!r}), AutoTokenizer.from_pretrained({str(output)!r})"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    import dataclasses
    import logging

    from aksis.checkpoint import find_checkpoint
    from aksis.corpora import DataError, load_corpus
    from aksis.generation import GenerationError
    from aksis.hub import HubError, is_hub_id, push_checkpoint
    from aksis.metrics import TASKS, evaluate_checkpoint, markdown_table, read_prompts, save_results

    logging.getLogger("aksis").setLevel(logging.INFO)
    requested = [t.strip() for t in args.tasks.split(",") if t.strip()]
    metrics = [t for t in requested if t in ("bleu", "rouge")] or ["bleu", "rouge"]
    tasks = [t for t in requested if t not in ("bleu", "rouge")]
    if set(requested) & {"bleu", "rouge"} and not set(tasks) & {"continuation", "prompts"}:
        tasks.append("prompts" if args.prompts_file else "continuation")  # BLEU / ROUGE score generations
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CLIError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join([*TASKS, 'bleu', 'rouge'])}")
    if args.prompts_file and "prompts" not in tasks:
        tasks.append("prompts")
    if args.push_to_hub and args.compare:
        raise CLIError("--push-to-hub pushes one checkpoint's results: leave out --compare")
    if args.push_to_hub and not args.hub_model_id:
        raise CLIError("--push-to-hub needs --hub-model-id user/name")
    if args.push_to_hub and is_hub_id(args.checkpoint_path):
        raise CLIError("--push-to-hub needs a local checkpoint folder (download the repo, or evaluate it locally)")
    for name in ("max_texts", "batch_size", "prompt_tokens", "new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        prompts = read_prompts(args.prompts_file) if args.prompts_file else []
        texts: list[str] = []
        if {"perplexity", "continuation"} & set(tasks):
            corpus = load_corpus(args.dataset, text_column=args.text_column)
            if args.split not in corpus:
                raise CLIError(f"the dataset has no split {args.split!r}: choose from {', '.join(corpus)}")
            texts = [row["text"] for row in corpus[args.split].take(args.max_texts)]
    except (DataError, ValueError) as err:
        raise CLIError(str(err)) from err
    columns: dict[str, dict[str, float]] = {}
    for source in [args.checkpoint_path, *(args.compare or [])]:
        args.checkpoint_path = source
        model, tokenizer, base = _load_model(args)
        # Greedy unless a sampler is chosen: scores should not depend on the luck of the draw.
        config = _generation_config(args, base if args.sampler else dataclasses.replace(base, temperature=0.0))
        try:
            results = evaluate_checkpoint(
                model,
                tokenizer,
                texts,
                tasks=tasks,
                metrics=metrics,
                config=config,
                prompts=prompts,
                stride=args.stride,
                batch_size=args.batch_size,
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                num_samples=args.num_samples,
                progress=True,
            )
        except (ValueError, GenerationError) as err:
            raise CLIError(f"{source}: {err}") from err
        columns[source] = results["metrics"]
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "compare", "checkpoint_path")}
        if is_hub_id(source):  # results are written into local checkpoint folders only
            continue
        folder = Path(find_checkpoint(source))  # already resolved once by _load_model: cannot fail here
        if not args.no_save:
            path = save_results(folder, results, dataset=args.dataset, split=args.split, settings=settings)
            print(f"wrote {path}", file=sys.stderr)
        if args.push_to_hub:
            try:
                push_checkpoint(folder, args.hub_model_id, commit_message="aksis: evaluation results")
            except HubError as err:
                raise CLIError(str(err)) from err
            print(f"pushed the results to {args.hub_model_id}", file=sys.stderr)
    what = ", ".join(tasks) + (f" ({' and '.join(metrics)})" if set(tasks) - {"perplexity"} else "")
    print(f"## Evaluation on {args.dataset} / {args.split}: {what}\n")
    print(markdown_table(columns))


# ----- inference: generate-text, chat-with-model, benchmark-inference -----


def _device_and_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    """--device (auto: CUDA, MPS, else CPU) and the compute dtype --dtype asks for (--mixed-precision: bf16)."""
    from aksis.device import DeviceError, pick_device
    from aksis.quantize import compute_dtype

    try:
        device = pick_device(args.device)
    except DeviceError as err:
        raise CLIError(f"--device: {err}") from err
    return device, compute_dtype("bf16" if args.mixed_precision else args.dtype)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, generation config) of --checkpoint-path on --device, at --dtype and --quantize, compiled for
    decoding with --compile (where the command has it)."""

    from aksis.checkpoint import CheckpointError, load_model

    device, dtype = _device_and_dtype(args)
    try:
        model, tokenizer, config = load_model(
            args.checkpoint_path, device=device, dtype=dtype, quantize_to=args.quantize
        )
    except CheckpointError as err:
        raise CLIError(str(err)) from err
    return (_compiled(model) if getattr(args, "compile", False) else model), tokenizer, config


def _compiled(model: Any) -> Any:
    """compile_for_decoding(model), saying what compiling ahead of time costs and where it is kept."""
    from aksis.aot import CompiledDecoder, steps_dir
    from aksis.generation import compile_for_decoding

    model = compile_for_decoding(model)
    if isinstance(model, CompiledDecoder):
        print(
            "note: the decode step is compiled ahead of time at its first use (about 10 s for the base preset), once "
            f"for each batch size, and kept in {steps_dir()} for the next run",
            file=sys.stderr,
        )
    return model


def _add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the model for decoding: on a CPU with aksis's kernels its decode step ahead of time "
        "(AOTInductor; faster at every precision), on a GPU with CUDA graphs",
    )


def _generation_config(args: argparse.Namespace, base: Any) -> Any:
    from aksis.generation import GenerationError, sampler_config

    settings = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.beam_width,
        length_penalty=args.length_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stop=args.stop,
        max_time=args.max_time,
    )
    if args.beam_width is not None and args.sampler != "beam":
        raise CLIError("--beam-width applies to --sampler beam")
    try:
        return sampler_config(args.sampler, base, **settings)
    except GenerationError as err:
        raise CLIError(str(err)) from err


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-path",
        required=True,
        help="a checkpoint folder, a training run's folder (its best/ checkpoint), or a Hugging Face Hub repo id",
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run (default: auto)"
    )
    _add_precision_arguments(parser)


def _add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    from aksis.quantize import DTYPES, SCHEMES

    parser.add_argument(
        "--dtype", default="fp32", choices=list(DTYPES), help="compute dtype: fp32 (default) or bf16 (half the memory)"
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=list(SCHEMES),
        help="quantize the linear layers at load time: int8 or int4 weights (fast on a CPU; default: none, or what "
        "a quantized checkpoint holds)",
    )
    parser.add_argument("--mixed-precision", action="store_true", help="the same as --dtype bf16")


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens_help: str) -> None:
    from aksis.generation import SAMPLER_PRESETS, SAMPLERS

    group = parser.add_argument_group(
        "sampling",
        "Unset options come from the checkpoint's generation_config.json (aksis defaults: temperature "
        "0.7, top-k 50, top-p 0.95).",
    )
    group.add_argument(
        "--sampler",
        choices=[*SAMPLERS, *SAMPLER_PRESETS],
        help="greedy (most likely token), temperature (the whole distribution), top-k, top-p (nucleus), beam "
        "search; or a preset: precise, balanced, creative (default: the checkpoint's settings)",
    )
    group.add_argument("--temperature", type=float, help="divide the logits by this; 0 is greedy")
    group.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    group.add_argument("--top-p", type=float, help="sample within the nucleus of this probability (1: all)")
    group.add_argument("--repetition-penalty", type=float, help="> 1 makes tokens already present less likely")
    group.add_argument("--beam-width", type=int, help="beams kept by --sampler beam (default: 4)")
    group.add_argument("--length-penalty", type=float, help="beam score = logprob / length ** this (default: 1)")
    group.add_argument("--max-new-tokens", type=int, help=max_new_tokens_help)
    group.add_argument("--stop", action="append", help="end the text at this string (repeatable)")
    group.add_argument("--seed", type=int, help="make sampling reproducible")
    group.add_argument("--max-time", type=float, help="stop generating after this many seconds (ended by time)")


def cmd_generate_text(args: argparse.Namespace) -> None:
    import time

    from aksis.generation import GenerationError, beam_search, stream

    if not args.prompt.strip():
        raise CLIError("the prompt is empty: give --prompt some text for the model to continue")
    model, tokenizer, base = _load_model(args)
    config = _generation_config(args, base)
    if args.num_return != 1 and config.num_beams == 1:
        raise CLIError("--num-return applies to beam search (--sampler beam)")
    start = time.perf_counter()
    try:
        if config.num_beams > 1 or args.sampler == "beam":
            beams = beam_search(model, tokenizer, args.prompt, config, num_return=args.num_return)
            for i, beam in enumerate(beams):
                if len(beams) > 1:
                    print(f"--- beam {i + 1} (score {beam.score:.3f}, log-probability {beam.logprob:.3f})")
                print(args.prompt + beam.text)
            completion = beams[0]
        else:
            text_stream = stream(model, tokenizer, args.prompt, config)
            if args.stream:
                print(args.prompt, end="", flush=True)
                for piece in text_stream:
                    print(piece, end="", flush=True)
                print()
            else:
                text = "".join(text_stream)
                print(args.prompt + text)
            assert text_stream.completion is not None
            completion = text_stream.completion
    except GenerationError as err:
        raise CLIError(str(err)) from err
    seconds = time.perf_counter() - start
    n = len(completion.token_ids)
    print(
        f"[{n} tokens in {seconds:.2f}s ({n / seconds:.1f} tokens/s), ended by {completion.finish_reason}]",
        file=sys.stderr,
    )


CHAT_HELP = "/reset forgets the conversation, /save [FILE] saves it, /quit leaves (so do Ctrl-D and Ctrl-C)"


def cmd_chat_with_model(args: argparse.Namespace) -> None:
    from aksis.chat import Conversation, reply
    from aksis.chat_template import ChatError
    from aksis.generation import GenerationError

    if args.budget is not None and args.budget < 8:
        raise CLIError(f"--budget must be at least 8 tokens, got {args.budget}")
    context_file = Path(args.context_file).expanduser() if args.context_file else None
    conversation = Conversation()
    if context_file is not None and context_file.exists():
        try:
            conversation = Conversation.load(context_file)
        except ChatError as err:
            raise CLIError(str(err)) from err
    if args.system_prompt is not None:
        conversation.system_prompt = args.system_prompt
    model, tokenizer, base = _load_model(args)
    config = _generation_config(args, base)
    if config.num_beams > 1:
        raise CLIError("chat streams its replies: choose a sampler other than beam")

    def save(path: Path | None = context_file) -> bool:
        if path is None:
            return False
        try:
            conversation.save(path)
        except ChatError as err:
            print(f"(error: {err})", file=sys.stderr)
            return False
        return True

    if context_file is not None and not context_file.exists():
        writable = context_file.parent.expanduser()
        while not writable.exists():
            writable = writable.parent
        if not (writable.is_dir() and os.access(writable, os.W_OK)):
            raise CLIError(f"cannot write the context file {context_file}: choose a path in a folder you can write")

    resumed = f", {len(conversation.messages)} messages from {context_file}" if conversation.messages else ""
    print(f"chatting with {args.checkpoint_path}{resumed}. {CHAT_HELP}.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, rest = text.partition(" ")
                if command == "/quit":
                    break
                if command == "/reset":
                    conversation.reset()
                    save()
                    print("(conversation cleared)")
                elif command == "/save":
                    target = Path(rest.strip()).expanduser() if rest.strip() else context_file
                    if target is None:
                        print("(give a file: /save chat.json, or start with --context-file)")
                    elif save(target):
                        print(f"(saved to {target})")
                else:
                    print(f"(unknown command {command}: {CHAT_HELP})")
                continue
            conversation.add("user", text)
            print("model> ", end="", flush=True)
            try:
                for piece in reply(model, tokenizer, conversation, config, budget=args.budget):
                    print(piece, end="", flush=True)
            except (ChatError, GenerationError) as err:
                conversation.messages.pop()  # the message that could not be answered
                print(f"\n(error: {err})")
                continue
            print()
            save()
    except KeyboardInterrupt:
        print()
    if save():
        print(f"conversation saved to {context_file}", file=sys.stderr)


def cmd_benchmark_inference(args: argparse.Namespace) -> None:
    import json
    import resource
    import statistics

    import torch

    from aksis.config import ModelConfig
    from aksis.generation import time_decoding
    from aksis.kernels import use_cpu_kernels
    from aksis.model import GPT
    from aksis.quantize import QuantizationError, quantization_of, quantize
    from aksis.tokenizer import Tokenizer

    for name in ("max_new_tokens", "num_runs", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.checkpoint_path:
        model, tokenizer, _ = _load_model(args)
        source = args.checkpoint_path
    else:
        try:
            config = ModelConfig.from_preset(args.preset)
        except ValueError as err:
            raise CLIError(str(err)) from err
        device, dtype = _device_and_dtype(args)
        model = GPT(config).to(device=device, dtype=dtype).eval()
        try:
            quantize(model, args.quantize)
        except QuantizationError as err:
            raise CLIError(str(err)) from err
        if device.type == "cpu":  # as load_model does for a checkpoint
            use_cpu_kernels(model)
        tokenizer, source = Tokenizer.byte_level(), f"preset {args.preset} (random weights)"
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise CLIError("the prompt is empty: give --prompt some text")
    device = next(model.parameters()).device
    n_params = model.num_params()  # the architecture's count, however its layers are stored
    if args.compile:
        model = _compiled(model)

    def runs(use_cache: bool) -> list[Any]:
        kwargs = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, use_cache=use_cache)
        time_decoding(model, prompt, **kwargs)  # warm-up: allocation, kernels, compilation
        return [time_decoding(model, prompt, **kwargs) for _ in range(args.num_runs)]

    def summary(timings: list[Any]) -> dict[str, Any]:
        out = {}
        for key, values in {
            "tokens_per_s": [t.tokens_per_s for t in timings],
            "ttft_ms": [1000 * t.ttft_s for t in timings],
            "ms_per_token": [t.ms_per_token for t in timings],
        }.items():
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results: dict[str, Any] = {"cached": summary(runs(True))}
    if args.compare_no_cache:
        results["no_cache"] = summary(runs(False))
        speedup = results["cached"]["tokens_per_s"]["median"] / results["no_cache"]["tokens_per_s"]["median"]
        results["speedup"] = speedup
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process resident memory"
    report = {
        "model": source,
        "parameters": n_params,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantization": quantization_of(model),
        "compiled": args.compile,
        "batch_size": args.batch_size,
        "prompt_tokens": len(prompt),
        "new_tokens": args.max_new_tokens,
        "runs": args.num_runs,
        **results,
        "peak_memory_mib": round(peak, 1),
        "peak_memory_kind": peak_kind,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['model']}: {report['parameters'] / 1e6:.2f}M parameters on {report['device']} ({report['dtype']}"
        + (f", {report['quantization']} weights" if report["quantization"] != "none" else "")
        + f"{', compiled' if args.compile else ''}); batch {args.batch_size}, {len(prompt)} prompt tokens, "
        f"{args.max_new_tokens} new tokens, median of {args.num_runs} runs (min-max)"
    )
    labels = {"tokens_per_s": "tokens/s", "ttft_ms": "time to first token (ms)", "ms_per_token": "ms per token"}
    modes = [m for m in ("cached", "no_cache") if m in results]
    print(f"{'':28}" + "".join(f"{m.replace('_', ' '):>26}" for m in modes))
    for key, label in labels.items():
        cells = [results[m][key] for m in modes]
        print(f"{label:28}" + "".join(f"{c['median']:>10.1f} ({c['min']:.1f}-{c['max']:.1f})".rjust(26) for c in cells))
    if "speedup" in results:
        print(f"KV cache speedup: {results['speedup']:.2f}x tokens/s")
    print(f"peak memory: {report['peak_memory_mib']:.0f} MiB ({peak_kind})")


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

    from aksis.config import GGUF_OUT_TYPES, TRAIN_CHOICES, TRAIN_HELP, TrainConfig  # plain dataclasses: cheap

    load = commands.add_parser(
        "load-data", help="load, tokenize and pack a corpus; print its statistics and a decoded sample batch"
    )
    defaults = TrainConfig()
    for name, kind in [
        ("dataset", str),
        ("data_format", str),
        ("text_column", str),
        ("tokenizer", str),
        ("vocab_size", int),
        ("val_fraction", float),
        ("batch_size", int),
    ]:
        default = getattr(defaults, name)
        load.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            choices=TRAIN_CHOICES.get(name),
            help=f"{TRAIN_HELP[name]} (default: {default})".replace("%", "%%"),
        )
    load.add_argument("--streaming", action="store_true", help=TRAIN_HELP["streaming"])
    load.add_argument("--max-length", type=int, default=256, help="tokens per block, the context (default: 256)")
    load.add_argument("--show-chars", type=int, default=400, help="characters shown per block (default: 400)")
    load.set_defaults(func=cmd_load_data)

    gen = commands.add_parser("generate-text", help="continue a prompt with a trained model")
    _add_model_arguments(gen)
    _add_compile_argument(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    _add_sampling_arguments(gen, "tokens to generate at most (default: the checkpoint's, 256)")
    gen.add_argument("--num-return", type=int, default=1, help="beam search: print this many best beams")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.set_defaults(func=cmd_generate_text)

    chat = commands.add_parser(
        "chat-with-model",
        help="chat in the terminal; the conversation can be kept in a JSON file",
        description=f"Chat with a model, replies streamed. {CHAT_HELP}.",
    )
    _add_model_arguments(chat)
    _add_compile_argument(chat)
    chat.add_argument("--system-prompt", help="the system message (replaces the one in --context-file)")
    chat.add_argument(
        "--context-file", help="load the conversation from this JSON file if it exists; save it after every turn"
    )
    chat.add_argument(
        "--budget", type=int, help="tokens of conversation the model reads; older turns are dropped (default: context)"
    )
    _add_sampling_arguments(chat, "tokens per reply at most (default: the checkpoint's, 256)")
    chat.set_defaults(func=cmd_chat_with_model)

    bench = commands.add_parser(
        "benchmark-inference",
        help="time generation: tokens/s, time to first token, ms per token, peak memory",
        description="Time greedy generation of exactly --max-new-tokens tokens per row, after one warm-up run.",
    )
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint-path", help="a checkpoint folder, training run folder or Hub repo id")
    which.add_argument("--preset", help="a model preset with random weights (base, small, tiny, ...)")
    bench.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.", help="the prompt")
    bench.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    bench.add_argument("--num-runs", type=int, default=5, help="timed runs (default: 5)")
    bench.add_argument("--batch-size", type=int, default=1, help="copies of the prompt decoded together (default: 1)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(default: auto)")
    _add_precision_arguments(bench)
    _add_compile_argument(bench)
    bench.add_argument("--compare-no-cache", action="store_true", help="also time decoding without the KV cache")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(func=cmd_benchmark_inference)

    ev = commands.add_parser(
        "evaluate",
        help="perplexity, bits per byte, BLEU / ROUGE of generations: a Markdown report (and eval_results.json)",
        description="Evaluate a checkpoint (and others side by side with --compare). Writes eval_results.json into "
        "a local checkpoint folder; the Hub model card shows it as model-index results.",
    )
    _add_model_arguments(ev)
    ev.add_argument("--compare", nargs="+", metavar="CHECKPOINT", help="more checkpoints to evaluate side by side")
    ev.add_argument(
        "--dataset", default="shakespeare", help="held-out texts: a corpus name or files (default: shakespeare)"
    )
    ev.add_argument("--split", default="validation", help="the split to evaluate on (default: validation)")
    ev.add_argument("--text-column", help="the text column, for Hub datasets and .jsonl/.parquet files")
    ev.add_argument("--max-texts", type=int, default=100, help="evaluate on at most this many documents (default: 100)")
    ev.add_argument(
        "--tasks",
        default="perplexity,continuation",
        help="comma-separated: perplexity, continuation (generate the next tokens of held-out text), prompts "
        "(--prompts-file), bleu, rouge (which scores generations get; default both) (default: perplexity,continuation)",
    )
    ev.add_argument("--prompts-file", help='a JSONL file of {"prompt": ..., "reference": ...} to generate from')
    ev.add_argument("--stride", type=int, help="perplexity window stride in tokens (default: half the context)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows or prompts per batch (default: 8)")
    ev.add_argument("--prompt-tokens", type=int, default=32, help="continuation: prompt length in tokens (default: 32)")
    ev.add_argument(
        "--new-tokens", type=int, default=32, help="continuation: tokens generated and compared (default: 32)"
    )
    ev.add_argument("--num-samples", type=int, default=50, help="continuation: held-out windows (default: 50)")
    ev.add_argument("--no-save", action="store_true", help="do not write eval_results.json")
    ev.add_argument(
        "--push-to-hub", action="store_true", help="push the checkpoint with its results (needs --hub-model-id)"
    )
    ev.add_argument("--hub-model-id", help="the Hub repo to push to with --push-to-hub")
    _add_sampling_arguments(ev, "prompts task: tokens to generate (default: the checkpoint's)")
    ev.set_defaults(func=cmd_evaluate)

    push = commands.add_parser(
        "push",
        help="push a checkpoint folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)",
        description="Push a checkpoint folder as one commit, with a generated model card and loss curve.",
    )
    push.add_argument(
        "--checkpoint-path",
        required=True,
        help="a checkpoint folder, or a training run's folder (its best/ checkpoint, else its newest step-N/)",
    )
    push.add_argument("--repo-id", required=True, help="user/name or org/name; created if it does not exist")
    push.add_argument("--revision", help="the branch to push to (default: main; created if needed)")
    push.add_argument("--tag", help="also tag the commit (e.g. v1); a tag that names another commit is an error")
    push.add_argument("--move-tag", action="store_true", help="move --tag to this commit when it names another one")
    push.add_argument(
        "--private",
        action=argparse.BooleanOptionalAction,
        help="make the repo private (--private) or public (--no-private); unset: a new repo is public and an "
        "existing one keeps its visibility",
    )
    push.add_argument("--license", help="the license in the model card (e.g. mit, apache-2.0)")
    push.add_argument("--commit-message", help="the commit message")
    push.add_argument(
        "--with-training-state", action="store_true", help="also push training_state/ (for --resume from the Hub)"
    )
    push.set_defaults(func=cmd_push)

    export = commands.add_parser(
        "export",
        help="write a checkpoint in another format (transformers folder, GGUF file for llama.cpp)",
        description="Write a checkpoint in another format. transformers: a folder that transformers' "
        "AutoModelForCausalLM and AutoTokenizer load, and aksis too (aksis saves in this format already; this "
        "converts a folder saved before it did). gguf: one file that llama.cpp, Ollama and LM Studio load.",
    )
    export.add_argument(
        "--checkpoint-path", required=True, help="a checkpoint folder, a training run's folder, or a Hub repo id"
    )
    export.add_argument("--format", required=True, choices=("transformers", "gguf"), help="the format to write")
    export.add_argument(
        "--output", "--output-dir", required=True, help="the folder (transformers) or .gguf file (gguf) to write"
    )
    export.add_argument(
        "--outtype", choices=GGUF_OUT_TYPES, help="gguf: the weights' type, default f32 (norms and biases stay f32)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    export.set_defaults(func=cmd_export)

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
    import logging

    args = parser.parse_args(argv)
    # aksis's own messages (a cut prompt, training progress) go to stderr as plain lines. Only the "aksis" logger
    # gets a handler: a root handler would print other libraries' messages twice, next to their own handlers.
    log = logging.getLogger("aksis")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
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
