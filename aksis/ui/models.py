"""The app's models: where they are found (local training runs, the Hub) and a bounded cache of loaded ones.

- `local_models()` lists the run and checkpoint folders under the checkpoints folder (`./checkpoints`);
  `hub_models()` lists the aksis models of one Hub author when the Hub can be reached (and nothing, quietly,
  when it cannot: the app works offline).
- `get(source)` loads a model once and keeps it: least recently used models are dropped when the weights kept
  would pass `max_bytes` (the newest is always kept). Loading is serialised per source, so many requests for a
  model that is not loaded yet load it once. A request holds its own reference, so dropping a model from the
  cache never disturbs a generation that is using it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aksis.checkpoint import (
    CARD_FILE,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    EVAL_RESULTS_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    find_checkpoint,
    is_local,
    load_model,
    resolve_file,
    split_revision,
)
from aksis.config import GenerationConfig
from aksis.hub import HubError, is_hub_id, list_models
from aksis.kernels import inference_bytes
from aksis.model import GPT
from aksis.quantize import check_scheme, quantization_of
from aksis.runs import METRICS_FILE
from aksis.tokenizer import MAX_FILE_BYTES as MAX_TOKENIZER_BYTES
from aksis.tokenizer import Tokenizer
from aksis.transformers_format import INDEX_FILE

log = logging.getLogger(__name__)

# A Hub id by its letters alone (user/name, with an optional @revision): no path, glob or "~" can match it.
# The files of a Hub checkpoint the app reads (loading it, and in the Model tab), and the bound on all but the weights
# and the tokenizer: far more than any of them holds.
READ_FILES = (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TOKENIZER_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    INDEX_FILE,
    CARD_FILE,
    METRICS_FILE,
    EVAL_RESULTS_FILE,
)
SIDE_FILE_BYTES = 4 << 20
HUB_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")


@dataclass
class LoadedModel:
    source: str  # as picked: a folder, a run folder, or a Hub id[@revision]
    checkpoint: str  # the checkpoint folder or Hub id the weights came from
    model: GPT
    tokenizer: Tokenizer
    generation: GenerationConfig
    nbytes: int  # memory its weights take for inference (aksis.kernels.inference_bytes)
    version: tuple[str, int, int] | None = None  # local weights: (file, mtime, size) when loaded; None on the Hub

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def describe(self) -> str:
        """One line about the model, for the status bar."""
        cfg = self.model.config
        return (
            f"**{self.source}**: {cfg.arch}, {cfg.n_layer} layers × {cfg.n_embd}, "
            f"{self.model.num_params() / 1e6:.2f}M parameters, context {cfg.block_size}, "
            f"tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size} tokens), on {self.device}"
            + (f", {scheme} weights" if (scheme := quantization_of(self.model)) != "none" else "")
        )

    def file(self, name: str) -> Path | None:
        """A file of the checkpoint (e.g. README.md, metrics.jsonl), downloaded when it is on the Hub; None when
        the checkpoint has none. metrics.jsonl of a local run lives beside best/ and step-N/, so the run folder is
        looked at too."""
        candidates = [self.checkpoint]
        if is_local(self.source) and Path(self.source).resolve() != Path(self.checkpoint).resolve():
            candidates.append(self.source)
        for candidate in candidates:
            try:
                return resolve_file(candidate, name)
            except CheckpointError:
                continue
        return None


class ModelStore:
    def __init__(
        self,
        checkpoints_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
        quantize: str = "none",
        compile: bool = False,
        max_bytes: int = 2 << 30,
        hub_author: str | None = None,
        local_paths: bool = True,
        request_seconds: float | None = None,
    ) -> None:
        """`request_seconds`: how long one request may run a model (see AppSettings.request_limit); None: no bound.
        `quantize`: the scheme full-precision models are quantized to at load (a quantized checkpoint stays as it is);
        the cache's bound counts what each model then takes (kernels.inference_bytes). `compile`: on a CPU with
        aksis's kernels, each model's decode step at batch 1 is compiled ahead of time as it is loaded (aksis.aot);
        other batch sizes (beam search, batches) stay eager, so that no request makes the app compile more."""
        self.checkpoints_dir = Path(checkpoints_dir)
        self.device = device
        self.dtype = dtype
        self.quantize = check_scheme(quantize)
        self.compile = compile
        self.max_bytes = max_bytes
        self.hub_author = hub_author
        self.local_paths = local_paths  # False: local models only from checkpoints_dir (see AppSettings.local_paths)
        self.request_seconds = request_seconds
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    # ----- finding -----

    def local_models(self) -> list[str]:
        """Run and checkpoint folders directly under the checkpoints folder, by name."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir()):
            try:
                find_checkpoint(folder)
            except CheckpointError:
                continue  # a folder that holds no checkpoint (yet): a run that is still starting, say
            found.append(str(folder))
        return found

    def hub_models(self) -> list[str]:
        if not self.hub_author:
            return []
        try:
            return list_models(self.hub_author)
        except HubError as err:
            log.info("not listing Hub models: %s", err)
            return []

    def choices(self, first: str | None = None) -> list[str]:
        """What the picker offers: `first` (the configured model), then local models, then Hub models."""
        names = ([first] if first else []) + self.local_models() + self.hub_models()
        return list(dict.fromkeys(names))

    def canonical(self, source: str) -> str:
        """One name per model: a Hub id as given (stripped), a local folder as the store lists it (a folder of the
        checkpoints folder as `<checkpoints>/<name>`, whatever way it was written), so that the leaderboard counts
        `checkpoints/x/` and `./checkpoints/x` as `checkpoints/x`."""
        source = source.strip()
        if HUB_ID.fullmatch(source):
            return source
        path = Path(os.path.normpath(Path(source).expanduser()))
        if self._in_checkpoints_dir(str(path)):
            return str(self.checkpoints_dir / path.resolve().relative_to(self.checkpoints_dir.resolve()))
        return str(path)

    # ----- loading -----

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def get(self, source: str | None, progress: Callable[[float, str], None] | None = None) -> LoadedModel:
        """The model named by `source`, loaded on first use, and again when its local weights have changed since
        (a run still training rewrites best/). Raises CheckpointError with what to do."""
        if source is not None and not isinstance(source, str):  # an API caller may send any JSON value
            raise CheckpointError(
                f"a model is named by text (a Hub id or a listed folder), got {type(source).__name__}"
            )
        source = (source or "").strip()
        if not source:
            raise CheckpointError("no model picked: choose one in the model picker (or train one in the Train tab)")
        version = _local_version(source)
        with self._lock:
            cached = self._cached(source, version)
            if cached is not None:
                return cached
            loading = self._loading.setdefault(source, threading.Lock())
        try:
            with loading:  # one load per source; others wait for it and then find it in the cache
                with self._lock:
                    cached = self._cached(source, version)
                if cached is not None:
                    return cached
                if progress is not None:
                    progress(0.1, f"loading {source}")
                entry = self._load(source)
                entry.version = version
                if progress is not None:
                    progress(1.0, f"loaded {source}")
                with self._lock:
                    self._models[source] = entry
                    self._models.move_to_end(source)
                    self._evict()
                return entry
        finally:
            with self._lock:
                self._loading.pop(source, None)

    def _cached(self, source: str, version: tuple[str, int, int] | None) -> LoadedModel | None:
        """The cached model of `source` when its weights are still those on disk (call with the lock held)."""
        entry = self._models.get(source)
        if entry is None or entry.version != version:
            return None
        self._models.move_to_end(source)
        return entry

    def _load(self, source: str) -> LoadedModel:
        if not self.local_paths and not HUB_ID.fullmatch(source) and not self._in_checkpoints_dir(source):
            # Decided from the name alone, before the file system is asked anything: a path outside the checkpoints
            # folder gets the same answer whether or not it exists (no oracle), and a revision (@...) belongs to Hub
            # ids only, never to a folder.
            raise CheckpointError(
                f"this app serves local models only from {self.checkpoints_dir}/: pick one of the listed models or "
                "name a Hub id (user/name or user/name@revision)"
            )
        if not is_local(source) and not is_hub_id(source):
            raise CheckpointError(
                f"{source[:80]!r} is neither a local folder nor a Hub id of the form user/name[@revision]"
            )
        if is_hub_id(source):
            split_revision(source)  # a malformed revision is named before any download
            if not self.local_paths:
                self._check_hub_size(source)
        elif not self.local_paths and not self._in_checkpoints_dir(source):
            raise CheckpointError(
                f"this app serves local models only from {self.checkpoints_dir}/: pick one of the listed models or "
                "name a Hub id"
            )
        checkpoint = find_checkpoint(source)
        # On a Space a model is refused before it is allocated when its weights pass the cache's bound (a repo's
        # config can ask for any size; the weights file's header says what loading it would take).
        bound = None if self.local_paths else self.max_bytes
        model, tokenizer, generation = load_model(
            checkpoint,
            device=self.device,
            dtype=self.dtype,
            max_bytes=bound,
            quantize_to=self.quantize,
            quantized_as_stored=True,
        )
        if self.compile:
            model = self._compiled(model, source)
        entry = LoadedModel(source, checkpoint, model, tokenizer, generation, inference_bytes(model))
        log.info("loaded %s (%.1f MB of weights) on %s", source, entry.nbytes / 1e6, self.device)
        return entry

    def _compiled(self, model: GPT, source: str) -> GPT:
        """`model` with its decode step at batch 1 compiled ahead of time, where aksis can (a CPU with its kernels)."""
        from aksis import native
        from aksis.aot import CompiledDecoder  # loads PyTorch's compiler: only for an app that compiles

        if self.device.type != "cpu" or not native.available():
            log.info(
                "AKSIS_COMPILE: %s decodes eager (steps compile ahead of time on a CPU with aksis's kernels)", source
            )
            return model
        compiled = CompiledDecoder(model, batch_sizes=(1,))
        compiled.prepare(batch_size=1)
        return compiled  # type: ignore[return-value]  # a GPT in all but name: it passes everything else on

    def _check_hub_size(self, source: str) -> None:
        """On a Space, refuse a Hub model before downloading anything when a file the app would read passes its
        bound (visitors may type any id, and a repo may hold a file of any size): the weights the cache's, the others
        SIDE_FILE_BYTES (the tokenizer aksis.tokenizer's). A file whose size the Hub does not say is refused too.
        When the repo cannot be reached, loading goes ahead and reports its own error."""
        from huggingface_hub import HfApi

        from aksis.hub import HUB_FAILURES

        repo_id, revision = split_revision(source)
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except HUB_FAILURES:
            return
        bounds = {name: SIDE_FILE_BYTES for name in READ_FILES}
        bounds.update({TOKENIZER_FILE: MAX_TOKENIZER_BYTES})
        weights = 0  # model.safetensors, or the shards of a sharded transformers checkpoint: all count
        for file in info.siblings or []:
            is_weights = file.rfilename.endswith(".safetensors") and "/" not in file.rfilename
            bound = self.max_bytes if is_weights else bounds.get(file.rfilename)
            if bound is None:
                continue  # never read by the app
            if file.size is None:
                raise CheckpointError(f"the Hub does not say how large {source}'s {file.rfilename} is: not loaded")
            weights += file.size if is_weights else 0
            if is_weights and weights > bound:
                raise CheckpointError(
                    f"{source} has at least {weights / 2**20:,.0f} MiB of weights; this app loads models of at most "
                    f"{bound / 2**20:,.0f} MiB (AKSIS_MODEL_CACHE_MB)"
                )
            if file.size > bound:
                raise CheckpointError(
                    f"{source}'s {file.rfilename} is {file.size / 2**20:,.1f} MiB; this app reads at most "
                    f"{bound / 2**20:,.0f} MiB of it"
                )

    def _in_checkpoints_dir(self, source: str) -> bool:
        return Path(source).expanduser().resolve().is_relative_to(self.checkpoints_dir.resolve())

    def _evict(self) -> None:
        """Drop least recently used models while the kept weights pass the bound; the newest always stays."""
        while len(self._models) > 1 and sum(m.nbytes for m in self._models.values()) > self.max_bytes:
            name, _ = self._models.popitem(last=False)
            log.info("unloaded %s to stay within %.0f MB", name, self.max_bytes / 1e6)


def _local_version(source: str) -> tuple[str, int, int] | None:
    """What identifies the weights a local source names right now: its checkpoint's weights file, with the file's
    modification time and size. None when there is no such file (loading then says why), and for a Hub id: that is
    loaded once, so a later push to its main branch shows after a restart (or at once as `user/name@<commit>`)."""
    try:
        if not is_local(source):
            return None
        weights = Path(find_checkpoint(source)) / WEIGHTS_FILE
        stat = weights.stat()
    except (CheckpointError, OSError):
        return None
    return str(weights.resolve()), stat.st_mtime_ns, stat.st_size
