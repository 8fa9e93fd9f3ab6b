"""The checkpoint folder: one format, written atomically, read back with clear errors; and loading a model to run.

    config.json              ModelConfig + format_version + aksis_version (the aksis that wrote it)
    model.safetensors        weights (tied weights stored once)
    tokenizer.json           aksis.tokenizer.Tokenizer (ranks, pattern, specials)
    generation_config.json   default sampling settings (GenerationConfig)
    README.md                model card (YAML metadata + text)

Loading needs only the first four; training adds metrics.jsonl and training_state/ beside them (aksis.runs), and
evaluation eval_results.json. The same folder is a Hugging Face Hub model repo: files come from a local folder or,
through huggingface_hub's download and cache, from a repo id `user/name[@revision]`. Saving is
`save_checkpoint(model, folder, tokenizer=...)`; `load_gpt` reads the model alone, `load_model` a model ready to run
with its tokenizer and sampling defaults, from a checkpoint or from a training run's folder (its best/ checkpoint,
else its newest step-N/). No pickle is ever loaded, and old config formats are upgraded in one place,
`upgrade_config`.

A model quantized for inference (aksis.quantize) is saved in aksis's layout with format_version 2 and
`"quantization": {"scheme": "int8" | "int4", ...}` in config.json: its linear layers' int8 or packed 4-bit weights
with their scales, the embeddings and norms as they were. It loads as it is (`load_model(folder)`), without
quantizing again, and older aksis versions refuse it by its format version instead of misreading it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCardData, hf_hub_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from aksis import __version__, native
from aksis.chat_template import JINJA as CHAT_JINJA
from aksis.config import GenerationConfig, ModelConfig
from aksis.device import pick_device
from aksis.hf_tokenizer import HFTokenizer, aksis_tokenizer_config, is_hf_tokenizer_file, to_hf_json
from aksis.kernels import use_cpu_kernels
from aksis.model import GPT
from aksis.quantize import INT4_GROUP_SIZE, QuantizationError, check_scheme, quantization_of, quantize, quantized_shell
from aksis.tokenizer import AKSIS_MARKER, Tokenizer, TokenizerError, tokenizer_from_hf
from aksis.transformers_format import (
    INDEX_FILE,
    Source,
    config_from_transformers,
    config_to_transformers,
    expressible_family,
    generation_from_transformers,
    generation_to_transformers,
    ignored,
    is_transformers_config,
    is_transformers_generation_config,
    transformers_state,
    weight_sources,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # Hugging Face tokenizers: special tokens and the chat template
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a chat template kept apart from tokenizer_config.json
TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)  # HFTokenizer.from_files
CARD_FILE = "README.md"
EVAL_RESULTS_FILE = "eval_results.json"  # written by aksis.metrics.save_results, read into the model card
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, GENERATION_CONFIG_FILE)
FORMAT_VERSION = 2  # the newest config.json format this aksis reads; a checkpoint states the oldest that reads it
QUANTIZED_FORMAT_VERSION = 2  # format 2 added "quantization": a checkpoint of quantized weights
LAYOUTS = ("transformers", "aksis")  # of a checkpoint folder aksis writes (save_checkpoint)
# Where a training run keeps its checkpoints (aksis.runs writes them): the best so far, and step-000500/ and so on.
BEST_DIR = "best"
STEP_PREFIX = "step-"
HUB_OPTIONS = ("revision", "cache_dir", "force_download", "token", "local_files_only")  # of resolve_file


class CheckpointError(Exception):
    """A checkpoint could not be read or written; the message names the file and what to do."""


class MissingFile(CheckpointError):
    """The folder or repo exists but lacks the file asked for."""


# ----- locating files: a local folder or a Hub repo -----


def is_local(source: str | Path) -> bool:
    """True when `source` names a local folder; raise when it looks like a path that does not exist."""
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    if path.exists():
        raise CheckpointError(f"{source} is a file; a checkpoint is a folder holding {', '.join(REQUIRED_FILES)}")
    text = str(source)
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
    if looks_like_path:
        raise CheckpointError(f"no checkpoint folder at {source}: check the path")
    return False


def split_revision(source: str | Path) -> tuple[str, str | None]:
    """("user/name", "rev") for a Hub id written "user/name@rev"; anything else (a local path, a plain id) is
    returned unchanged with no revision."""
    text = str(source)
    if "@" not in text or Path(text).expanduser().exists():
        return text, None
    repo_id, _, revision = text.partition("@")  # repo ids never hold "@"; revisions may hold "/"
    if not repo_id or not revision:
        raise CheckpointError(f"{text!r}: write a Hub revision as user/name@revision (a branch, tag or commit)")
    return repo_id, revision


def resolve_file(
    source: str | Path,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Path of `filename` in a local checkpoint folder, or downloaded (through the Hub cache) from a repo id,
    optionally written `user/name@revision`."""
    if is_local(source):
        path = Path(source).expanduser() / filename
        if not path.is_file():
            raise MissingFile(
                f"{path} is missing: a checkpoint folder needs {', '.join(REQUIRED_FILES)}. "
                "Was the folder written by save_pretrained, and copied completely?"
            )
        return path
    source, at = split_revision(source)
    revision = revision or at
    repo = f"{source}@{revision}" if revision else str(source)
    not_local = f"(there is no local folder named {source} either)"
    try:
        return Path(
            hf_hub_download(
                repo_id=str(source),
                filename=filename,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        )
    except hf_errors.HFValidationError as err:
        raise CheckpointError(
            f"{source!r} is neither a local folder nor a Hub repo id of the form 'user/name'"
        ) from err
    except hf_errors.RevisionNotFoundError as err:
        raise CheckpointError(f"revision {revision!r} does not exist in the Hub repo {source}") from err
    except hf_errors.RepositoryNotFoundError as err:
        raise CheckpointError(
            f"no model repo {source} on the Hub, or it is private and no token was given {not_local}: check the "
            "id or path, or log in (`hf auth login` or HF_TOKEN) if the repo is private"
        ) from err
    except hf_errors.RemoteEntryNotFoundError as err:
        raise MissingFile(f"the Hub repo {repo} has no {filename}: it is not an aksis checkpoint") from err
    except hf_errors.LocalEntryNotFoundError as err:
        known = try_to_load_from_cache(str(source), filename, cache_dir=cache_dir, revision=revision)
        if known is not None and not isinstance(known, str):  # the cache remembers that the repo lacks the file
            raise MissingFile(f"the Hub repo {repo} has no {filename} (as the local Hub cache remembers)") from err
        raise CheckpointError(
            f"{filename} of {repo} is not in the local Hub cache and the Hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE is set) {not_local}: connect once to download it, or check the path"
        ) from err


# ----- reading -----


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{shown(path)} is not valid JSON ({err}): the file is truncated or corrupt") from None
    except RecursionError:
        raise CheckpointError(f"{shown(path)} is nested too deeply to be a checkpoint's JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown(path)} should hold a JSON object, found {type(data).__name__}")
    return data


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a config.json of any known format version to the current ModelConfig fields."""
    data = dict(data)
    version = data.pop("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"format_version {version!r} is newer than this aksis understands ({FORMAT_VERSION}): upgrade aksis"
        )
    # Version 1 is the first format; 2 adds "quantization", which is not a ModelConfig field (stored_quantization).
    # "aksis_version" names the aksis that wrote the folder (written_by), in any format.
    data.pop("quantization", None)
    data.pop("aksis_version", None)
    return data


def written_by(folder: str | Path) -> str | None:
    """The version of aksis that wrote a checkpoint folder (None for a folder that does not say: written before
    aksis recorded it, or by another tool)."""
    path = Path(folder) / CONFIG_FILE
    data = read_json(path) if path.is_file() else {}
    entry = data.get("aksis")
    version = entry.get("version") if isinstance(entry, dict) else data.get("aksis_version")
    return version if isinstance(version, str) and len(version) <= 40 else None


def stored_quantization(path: Path) -> str:
    """The quantization scheme a checkpoint's weights are stored in ("none" unless its config.json says one)."""
    data = read_json(path).get("quantization")
    if data is None:
        return "none"
    scheme = data.get("scheme") if isinstance(data, dict) else None
    group_size = data.get("group_size", INT4_GROUP_SIZE) if isinstance(data, dict) else None
    if not isinstance(scheme, str) or scheme == "none" or group_size != INT4_GROUP_SIZE:
        raise CheckpointError(
            f"{shown(path)}: its quantization entry {str(data)[:80]!r} is not one this aksis reads "
            f"(int8, or int4 in groups of {INT4_GROUP_SIZE}): upgrade aksis or re-save the checkpoint"
        )
    try:
        return check_scheme(scheme)
    except QuantizationError as err:
        raise CheckpointError(f"{shown(path)}: {err}") from None


def read_model_config(path: Path) -> ModelConfig:
    """The ModelConfig of a config.json: aksis's own, or a transformers one of a family aksis reads."""
    return read_config(path)[0]


def read_config(path: Path) -> tuple[ModelConfig, bool]:
    """The ModelConfig of a config.json, and whether the checkpoint is in the transformers layout (its config.json
    names a `model_type`, its weights transformers' names)."""
    data = read_json(path)
    try:
        if is_transformers_config(data):
            config = config_from_transformers(data)
            aksis = data.get("aksis", {})  # what aksis adds to a transformers config.json it writes
            if not isinstance(aksis, dict):
                raise ValueError(f'its "aksis" entry should be an object, got {aksis!r}')
            return dataclasses.replace(config, dropout=aksis.get("dropout", 0.0)), True
        return ModelConfig.from_dict(upgrade_config(data)), False
    except (ValueError, TypeError) as err:  # FormatError is a ValueError
        raise CheckpointError(f"{shown(path)}: {err}") from None


# Where the Hub cache keeps a repo's file: .../models--user--name/snapshots/<commit>/file
_HUB_CACHE_FILE = re.compile(
    r"models--(?P<namespace>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][0-9a-f]+[/\\](?P<file>.+)$"
)


def shown(path: Path) -> str:
    """How an error names a file: a file of a Hub repo as `user/name/file`, never by where the Hub cache keeps it on
    this machine (a Space would show its visitors the server's paths); a local file as it was given."""
    match = _HUB_CACHE_FILE.search(str(path))
    if match is None:
        return str(path)
    return f"{match['namespace']}/{match['name']}/{match['file']}"


def weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a weights file holds, by name: their shapes, read from the file's header without reading the
    tensors (so a file can be checked against its config before anything is allocated)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{shown(path)} is truncated or corrupt ({err}): save the checkpoint again or re-download it"
        ) from None


def check_weights(model: torch.nn.Module, header: dict[str, tuple[int, ...]], path: Path) -> None:
    """CheckpointError unless the file's tensors (`header`: names and shapes) are exactly the model's. A tied weight
    is stored under one of its names. `model` may be on the meta device: only names and shapes are compared."""
    aliases = _aliases(model)  # one entry per parameter, with all its names
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    missing = sorted(first for first, names in aliases.items() if not set(names) & set(header))
    unexpected = sorted(set(header) - set(shapes))
    mismatched = [
        f"{k} is {shape} in the file but {shapes[k]} in the model"
        for k, shape in header.items()
        if k in shapes and shape != shapes[k]
    ]
    _refuse_mismatch(path, missing, unexpected, mismatched)


def _refuse_mismatch(path: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    """CheckpointError listing what a weights file lacks, holds in excess or holds in another shape (if anything)."""
    if not (missing or unexpected or mismatched):
        return
    details = []
    if missing:
        details.append(f"missing tensors: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        details.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    details.extend(mismatched[:8])
    raise CheckpointError(
        f"{shown(path)} does not match config.json beside it ({'; '.join(details)}): "
        "the two files come from different models"
    )


def load_tokenizer(source: str | Path, **hub_kwargs: Any) -> Tokenizer:
    """The tokenizer of a checkpoint (local folder or Hub repo): aksis's own tokenizer.json, or a Hugging Face one
    (aksis.hf_tokenizer) with its tokenizer_config.json, generation_config.json and chat_template.jinja where the
    checkpoint has them."""
    try:
        path = resolve_file(source, TOKENIZER_FILE, **hub_kwargs)
    except MissingFile as err:
        if not read_config(resolve_file(source, CONFIG_FILE, **hub_kwargs))[1]:
            raise
        raise CheckpointError(
            f"{source} has no {TOKENIZER_FILE}: aksis reads a pretrained model's tokenizer in the Hugging Face "
            "tokenizer.json format (a repo with only a SentencePiece tokenizer.model needs one written, e.g. by "
            "transformers: AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        ) from err
    try:
        if not is_hf_tokenizer_file(path):
            return Tokenizer.load(path)
        config, generation, template = (_optional_file(source, name, hub_kwargs) for name in TOKENIZER_SIDE_FILES)
        marker = read_json(config).get(AKSIS_MARKER) if config is not None else None
        if marker is not None:  # aksis's own tokenizer, written so that transformers reads it too
            return tokenizer_from_hf(path, marker)
        return HFTokenizer.from_files(path, config, generation, template, name=str(source))
    except TokenizerError as err:
        folder = shown(path).removesuffix(TOKENIZER_FILE).rstrip("/") or "."
        raise CheckpointError(str(err).replace(str(path.parent), folder)) from None


def _optional_file(source: str | Path, filename: str, hub_kwargs: dict[str, Any]) -> Path | None:
    try:
        return resolve_file(source, filename, **hub_kwargs)
    except MissingFile:
        return None


def load_generation_config(source: str | Path, **hub_kwargs: Any) -> GenerationConfig:
    """The default sampling settings of a checkpoint (local folder or Hub repo): aksis's generation_config.json or
    transformers' (whose vocabulary differs; a transformers checkpoint without one samples with the defaults)."""
    try:
        path = resolve_file(source, GENERATION_CONFIG_FILE, **hub_kwargs)
    except MissingFile:
        if not read_config(resolve_file(source, CONFIG_FILE, **hub_kwargs))[1]:
            raise
        return GenerationConfig()
    data = read_json(path)
    try:
        if is_transformers_generation_config(data):
            data = generation_from_transformers(data)
        return GenerationConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{shown(path)}: {err}") from None


# ----- writing -----


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block succeeds it replaces `target` by
    renames, so a crash at any point leaves either the old complete folder or the new one, never a mix.
    An existing non-empty folder that is not a checkpoint is never replaced."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; give a folder path for the checkpoint")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_FILE).exists():
        raise CheckpointError(
            f"{target} is a non-empty folder that is not a checkpoint; refusing to replace it. "
            "Choose a new or empty folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):  # make the contents durable before they become visible
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{tag}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _card(config: ModelConfig, family: str | None = None, base_model: str | None = None, scheme: str = "none") -> str:
    """The model card of a checkpoint saved here: the Hub's metadata and how to load it. A push replaces it with
    the full card of aksis.hub (training, evaluation, samples)."""
    tags = ["aksis", "text-generation", *(["transformers", family] if family else [])]
    data = ModelCardData(library_name="aksis", pipeline_tag="text-generation", tags=tags, base_model=base_model)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"An aksis checkpoint: a {config.arch}-style decoder-only transformer, {config.n_layer} layers x "
        f"{config.n_embd}, context {config.block_size} tokens, vocabulary {config.vocab_size:,}."
        + (f" Fine-tuned from {base_model}." if base_model else "")
        + (f" Its linear layers are quantized to {scheme} for CPU inference." if scheme != "none" else ""),
        "",
        "```python",
        "from aksis.checkpoint import load_model",
        "",
        'model, tokenizer, settings = load_model("path/or/user-name")',
        "```",
        "",
    ]
    if family:
        lines += [
            f"The folder is also a transformers checkpoint ({family} family):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/or/user-name")',
            'tokenizer = AutoTokenizer.from_pretrained("path/or/user-name")',
            "```",
            "",
        ]
    return "\n".join(lines)


def stored_once(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for a weights file: a tensor shared by several names (tied embeddings) under the first
    name the model gives it only, each contiguous."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    return tensors


def save_checkpoint(
    model: GPT,
    folder: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    generation_config: GenerationConfig | None = None,
    base_model: str | None = None,
    layout: str = "transformers",
) -> None:
    """Write `model` as a checkpoint folder, atomically. Pass the `tokenizer` so the folder is complete (generation
    needs it); `generation_config` defaults to `GenerationConfig()`; `base_model` is the model it was fine-tuned from
    (a Hub id), remembered in config.json and the card.

    Where a transformers family expresses the model (every llama-flavour model; a gpt2-flavour one without grouped-
    query attention), the folder is in transformers' layout, which aksis reads as well: config.json with that family's
    fields (and aksis's own under "aksis"), transformers' weight names, tokenizer.json in the tokenizers library's
    format with tokenizer_config.json, and generation_config.json in transformers' vocabulary. Then
    `AutoModelForCausalLM` and `AutoTokenizer` load it as they are. Otherwise, or with `layout="aksis"`, it is in
    aksis's own layout (format 1, what aksis wrote before it read transformers checkpoints; it still loads)."""
    config = model.config
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} "
            "embeddings: build the model with vocab_size >= tokenizer.vocab_size"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    scheme = quantization_of(model)  # quantized weights have no transformers layout: aksis's own, format 2
    family = expressible_family(config) if layout == "transformers" and scheme == "none" else None
    generation = generation_config or GenerationConfig()
    with atomic_folder(folder) as tmp:
        if family is None and scheme != "none":
            quantization = {"scheme": scheme, **({"group_size": INT4_GROUP_SIZE} if scheme == "int4" else {})}
            data = {"format_version": QUANTIZED_FORMAT_VERSION, **config.to_dict(), "quantization": quantization}
            data["aksis_version"] = __version__
            tensors = stored_once(model)
        elif family is None:
            data = {"format_version": 1, **config.to_dict(), "aksis_version": __version__}
            tensors = stored_once(model)
        else:
            aksis: dict[str, Any] = {"format_version": 1, "version": __version__, "dropout": config.dropout}
            data = {**config_to_transformers(config, family), "aksis": aksis}
            if base_model:
                aksis["base_model"] = base_model
            tensors = transformers_state(model)
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        # One metadata entry: safetensors writes its metadata in no fixed order (the aliases save_model adds for tied
        # weights made two saves of the same model differ), and a checkpoint must be the same bytes every time.
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if family is None:
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_FILE)
            generation.save(tmp / GENERATION_CONFIG_FILE)
        else:
            eos_ids = [tokenizer.eot_id] if tokenizer is not None else []
            if isinstance(tokenizer, HFTokenizer):
                tokenizer.save_files(tmp)
                eos_ids = tokenizer.eos_ids
            elif tokenizer is not None:
                (tmp / TOKENIZER_FILE).write_text(to_hf_json(tokenizer), encoding="utf-8")
                tokenizer_config = aksis_tokenizer_config(tokenizer, CHAT_JINJA, config.block_size)
                (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
            bos = tokenizer.bos_id if tokenizer is not None else None
            settings = generation_to_transformers(generation.to_dict(), eos_ids, bos)
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(_card(config, family, base_model, scheme), encoding="utf-8")


def load_gpt(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    **hub_options: Any,
) -> GPT:
    """The model of a checkpoint, a local folder or a Hub repo id (`user/name` or `user/name@revision`, through the
    Hub cache), on `device` (in `dtype`, else float32), in eval mode; refused when its weights would take more than
    `max_bytes`. The checkpoint is aksis's own, or a transformers one of a family aksis reads (transformers_format).
    `hub_options` are resolve_file's (revision, cache_dir, force_download, token, local_files_only).

    Nothing is allocated before the config has been checked against the weights files' headers (names, shapes and
    the number of layers): a config that asks for a model larger than its weights is refused first. The model is then
    built without memory (meta device), given storage once, and filled one tensor at a time, so loading takes the
    model's memory and one tensor more, not two copies."""
    unknown = sorted(set(hub_options) - set(HUB_OPTIONS))
    if unknown:
        raise TypeError(f"load_gpt got unexpected option(s) {', '.join(unknown)}; it takes {', '.join(HUB_OPTIONS)}")
    # Config first, so every failure (bad path, missing repo, offline, corrupt or invalid config) names the file
    # before any weights are read.
    config_path = resolve_file(source, CONFIG_FILE, **hub_options)
    config, foreign = read_config(config_path)
    scheme = stored_quantization(config_path)
    files = _weight_files(source, foreign, hub_options)
    headers = _headers(files)  # read once: the checks below and the plan share them
    _check_layers(config, headers[0], files[0])
    with torch.device("meta"):  # names and shapes only, no memory
        model = GPT(config).to(dtype=dtype or torch.float32)
        try:
            quantized_shell(model, scheme)  # the stored form of a quantized checkpoint's layers
        except QuantizationError as err:
            raise CheckpointError(f"{shown(config_path)}: {err}") from None
        plan = _plan(model, files, foreign, headers)
    wanted = sum(p.numel() * p.element_size() for p in model.parameters())
    if max_bytes is not None and wanted > max_bytes:
        raise CheckpointError(
            f"{shown(files[0])} makes a model of {wanted / 2**20:,.0f} MiB, more than the {max_bytes / 2**20:,.0f} "
            "MiB allowed here"
        )
    model.to_empty(device=device)
    if config.tie_embeddings and scheme == "none":  # a quantized lm_head has its own copy of the embedding
        model.lm_head.weight = model.transformer.wte.weight
    plan.fill(model)
    model.reset_rope()
    return model.eval()


def load_weights(model: GPT, folder: str | Path) -> None:
    """Load the weights of the checkpoint `folder` (aksis's layout or transformers') into `model`, which must have the
    checkpoint's shape: every tensor name and shape is checked first."""
    _, foreign = read_config(resolve_file(folder, CONFIG_FILE))
    files = _weight_files(folder, foreign, {})
    _plan(model, files, foreign).fill(model)


@dataclass
class _Plan:
    """How to fill a model from weights files: for each parameter (tied ones once), its Source, and where each tensor
    lies."""

    sources: dict[str, Source]
    where: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]

    def fill(self, model: torch.nn.Module) -> None:
        """Read the tensors into the model's parameters one at a time. A tensor stored as the parameter holds it (same
        dtype, no transpose; q, k and v are consecutive rows of c_attn) is read from the file straight into the
        parameter's memory; others pass through one temporary tensor. So loading holds the model once, plus at most
        one tensor: not a state dict beside the model, and not the file's pages mapped into memory."""
        params = dict(model.named_parameters())
        first = next(iter(self.where.values()))
        try:
            with ExitStack() as stack, torch.no_grad():
                files = {p: stack.enter_context(open(p, "rb")) for p in set(self.where.values())}
                layouts = {p: _layout(f) for p, f in files.items()}
                for name, src in self.sources.items():
                    param = params[name]
                    stored = [(files[self.where[n]], layouts[self.where[n]][n]) for n in src.names]
                    if not param.is_floating_point() and any(entry.dtype != param.dtype for _, entry in stored):
                        raise ValueError(f"{name} is stored as {stored[0][1].dtype}, not {param.dtype}")
                    direct = param.device.type == "cpu" and not src.transpose and param.is_contiguous()
                    if direct and all(entry.dtype == param.dtype for _, entry in stored):
                        flat, at = param.view(-1), 0
                        for file, entry in stored:
                            entry.read_into(file, flat[at : at + entry.numel])
                            at += entry.numel
                    else:
                        param.copy_(src.make([entry.read(file) for file, entry in stored]))
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{shown(first)} is truncated or corrupt ({err}): save the checkpoint again or re-download it"
            ) from None


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Stored:
    """Where a tensor's bytes lie in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read_into(self, file: Any, out: torch.Tensor) -> None:
        """Read the tensor into `out`, a contiguous CPU tensor of its dtype and size."""
        file.seek(self.start)
        if self.nbytes and file.readinto(out.view(torch.uint8).numpy().data) != self.nbytes:
            raise ValueError("the file ends inside a tensor")

    def read(self, file: Any) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(file, out.view(-1))
        return out


def _layout(file: Any) -> dict[str, _Stored]:
    """The tensors of an open safetensors file (already checked by `weights_header`): dtype, shape, byte range."""
    size = int.from_bytes(file.read(8), "little")
    header = json.loads(file.read(size))
    base = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{name} has the dtype {entry['dtype']}, which aksis does not load")
        begin, end = entry["data_offsets"]
        stored = _Stored(_DTYPES[entry["dtype"]], tuple(entry["shape"]), base + begin, end - begin)
        if stored.numel * stored.dtype.itemsize != stored.nbytes:
            raise ValueError(f"{name}'s byte range does not match its shape")
        out[name] = stored
    return out


Headers = tuple[dict[str, tuple[int, ...]], dict[str, Path]]  # every tensor's shape, and the file it is in


def _headers(files: list[Path]) -> Headers:
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for path in files:
        for name, shape in weights_header(path).items():
            shapes[name], where[name] = shape, path
    return shapes, where


def _check_layers(config: ModelConfig, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """CheckpointError unless the files' tensors (`shapes`) hold as many blocks as the config asks for: checked before
    a model of n_layer blocks is even built on the meta device (a hostile config may ask for a million)."""
    layers = {int(m[1]) for name in shapes if (m := _LAYER.search(name))}
    if len(layers) != config.n_layer:
        raise CheckpointError(
            f"{shown(path)} holds {len(layers)} layers but config.json beside it asks for {config.n_layer}: the "
            "two files come from different models"
        )


def _plan(model: GPT, files: list[Path], foreign: bool, headers: Headers | None = None) -> _Plan:
    shapes, where = headers or _headers(files)
    return _Plan(_sources(model, shapes, files[0], foreign), where, shapes)


_LAYER = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")  # the block a tensor belongs to, in either naming


def _weight_files(source: str | Path, foreign: bool, hub_options: dict[str, Any]) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or for a transformers checkpoint the shards its
    model.safetensors.index.json lists."""
    try:
        return [resolve_file(source, WEIGHTS_FILE, **hub_options)]
    except MissingFile:
        if not foreign:
            raise
    try:
        index_path = resolve_file(source, INDEX_FILE, **hub_options)
    except MissingFile:
        raise CheckpointError(
            f"{source} has neither {WEIGHTS_FILE} nor {INDEX_FILE}: aksis reads safetensors weights only, never "
            "pytorch_model.bin (a pickle, which can run code when loaded). Convert the weights to safetensors "
            "(transformers: save_pretrained(..., safe_serialization=True)) and try again"
        ) from None
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{shown(index_path)} has no weight_map: the file is truncated or not an index")
    shards = sorted(set(weight_map.values()), key=str)
    bad = [s for s in shards if not (isinstance(s, str) and _SHARD.fullmatch(s))]
    if bad:
        raise CheckpointError(f"{shown(index_path)} names weight files aksis does not read: {bad[:3]}")
    files = []
    for shard in shards:
        try:
            files.append(resolve_file(source, shard, **hub_options))
        except MissingFile:
            raise CheckpointError(
                f"{shown(index_path)} lists {shard}, which {source} lacks: the upload is incomplete"
            ) from None
    return files


_SHARD = re.compile(r"[\w.-]+\.safetensors")  # a shard is a safetensors file beside the index, never a path


def _sources(model: GPT, header: dict[str, tuple[int, ...]], path: Path, foreign: bool) -> dict[str, Source]:
    """For each of `model`'s parameters (tied ones once), the tensors of the files (`header`: names and shapes) that
    make it; CheckpointError unless they are exactly the model's, by name and shape."""
    if not foreign:  # aksis's own files: the model's names, a tied weight under one of its names
        check_weights(model, header, path)
        return {name: Source(tuple(n for n in names if n in header)[:1]) for name, names in _aliases(model).items()}
    sources = weight_sources(model.config, set(header))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted({n for src in sources.values() for n in src.names if n not in header})
    used = {n for src in sources.values() for n in src.names}
    # A tied model's file may hold the output projection as well (transformers ignores it then, and so does aksis).
    spare = {"lm_head.weight"} if model.config.tie_embeddings else set()
    unexpected = sorted(n for n in header if n not in used and n not in spare and not ignored(n))
    mismatched = [
        f"{', '.join(src.names)} {'is' if len(src.names) == 1 else 'make'} {src.shape(header)} in the file but "
        f"{shapes[name]} in the model"
        for name, src in sources.items()
        if not set(src.names) - set(header) and src.shape(header) != shapes[name]
    ]
    _refuse_mismatch(path, missing, unexpected, mismatched)
    return sources


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name, with all its names (a tied weight has several)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def base_model_of(source: str | Path) -> str | None:
    """The Hub model a checkpoint was fine-tuned from, or is: a Hub id itself (without its @revision), or what a
    local folder's config.json remembers (never a local path: a push would publish it)."""
    if not is_local(source):
        return split_revision(source)[0]
    path = Path(find_checkpoint(source)) / CONFIG_FILE
    aksis = read_json(path).get("aksis") if path.is_file() else None
    base = aksis.get("base_model") if isinstance(aksis, dict) else None
    return base if isinstance(base, str) else None


def find_checkpoint(source: str | Path) -> str:
    """A checkpoint folder, or for a training run's folder its best/ checkpoint (else its newest step-N/); Hub ids
    pass through unchanged."""
    path = Path(source).expanduser()
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return str(source)
    if (path / BEST_DIR / CONFIG_FILE).is_file():
        return str(path / BEST_DIR)
    steps = sorted(p for p in path.glob(f"{STEP_PREFIX}*") if (p / CONFIG_FILE).is_file())
    if steps:
        return str(steps[-1])
    raise CheckpointError(
        f"{source} is neither a checkpoint (no {CONFIG_FILE}) nor a training run (no {BEST_DIR}/ or "
        f"{STEP_PREFIX}N/ checkpoint)"
    )


def load_model(
    source: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    quantize_to: str | None = None,
    quantized_as_stored: bool = False,
) -> tuple[GPT, Tokenizer, GenerationConfig]:
    """A model ready to run (eval mode, on `device`: by default the best there is), with its tokenizer and default
    sampling settings, from a checkpoint folder, a training run's folder or a Hub repo id; refused when its weights
    would take more than `max_bytes` (as loaded: quantizing comes after). `dtype` is the compute dtype (default
    float32); `quantize_to` ("int8", "int4"; None or "none": as stored) quantizes the linear layers at load time
    (aksis.quantize). A quantized checkpoint runs at its own precision only: asking it for another is an error, or
    with `quantized_as_stored` (the app's setting, applied to whatever a visitor names) it runs as stored. On a CPU
    the remaining float linear layers are aksis.kernels' faster ones for inference."""
    name = find_checkpoint(source)
    wanted = check_scheme(quantize_to or "none")  # before any download or read
    model = load_gpt(name, device=pick_device(device), dtype=dtype, max_bytes=max_bytes)
    stored = quantization_of(model)
    if wanted not in ("none", stored) and not (quantized_as_stored and stored != "none"):
        if stored != "none":
            raise CheckpointError(
                f"{name} holds {stored} weights and runs only as {stored}: load the full-precision checkpoint it was "
                f"made from to run it as {wanted}"
            )
        try:
            quantize(model, wanted)
        except QuantizationError as err:
            raise CheckpointError(str(err)) from None
    if next(model.parameters()).device.type == "cpu":
        use_cpu_kernels(model)
        native.available()  # aksis's CPU kernels built (the first time) as part of loading, not of the first reply
    return model, load_tokenizer(name), load_generation_config(name)
