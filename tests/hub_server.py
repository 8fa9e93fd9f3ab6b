"""A small Hugging Face Hub look-alike on 127.0.0.1, so that tests drive the real `huggingface_hub` client end to end.

What it implements is what huggingface_hub 2.4 sends (read from its `hf_api.py`, `_commit_api.py`, `lfs.py` and
`file_download.py`) for the calls aksis and its tests make:

- repos: `POST /api/repos/create` (409 still carries `url`), `DELETE /api/repos/delete`,
  `PUT /api/{type}s/{repo}/settings` (visibility only);
- reading: `GET /api/{type}s/{repo}[/revision/{rev}]` (sha, siblings, README front matter as cardData,
  library_name and tags), `GET /api/{type}s?author=&filter=&search=&sort=` (filters match tags or library_name),
  `GET .../tree/{rev}[/{path}]` (one page, `recursive` honoured), `POST .../paths-info/{rev}`, `GET .../refs`,
  `GET .../commits/{rev}`, and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (with `Range`);
- writing: `POST .../preupload/{rev}`, the LFS batch API with the "basic" transfer (a one-time signed upload
  URL that takes no token, then verify), `POST .../commit/{rev}` (NDJSON: header with optional `parentCommit`,
  412 if the branch moved since; file, lfsFile, deletedFile, deletedFolder), `POST`/`DELETE .../branch/{name}`,
  `POST .../tag/{rev}`, `DELETE .../tag/{name}`;
- `GET /api/whoami-v2` and `POST /api/validate-yaml`.

Model and dataset repos alike (`datasets.load_dataset` reads a jsonl dataset repo from it).

Model choices, kept close to the real Hub so that client code behaves as it would there:

- A repo is a git-like history in memory: each commit has a 40-lowercase-hex sha, a parent and the full file
  manifest; branches and tags are refs to commits. `create_repo` makes an initial commit holding `.gitattributes`,
  as the Hub does. File contents live once each in `storage/objects/<sha256>` (content-addressed).
- Upload mode, as the Hub decides it: "lfs" for names matching `LFS_PATTERNS` (also written to `.gitattributes`),
  files larger than `LFS_THRESHOLD` (10 MB) and binary files (the 512-byte sample the client sends holds a NUL byte
  or is not UTF-8), "regular" otherwise. Xet is not implemented: clients must set HF_HUB_DISABLE_XET=1.
- Model card metadata is validated as the Hub does it, by `POST /api/validate-yaml` and again when a commit adds a
  README.md (400 "Invalid metadata in README.md."): a YAML mapping, a `license` among `LICENSES`, lists of strings
  for `tags` and `datasets`.
- ETag: the git blob sha1 for regular files, and `X-Linked-Etag` = sha256 for LFS files, as on the Hub.
- Auth is `Authorization: Bearer <token>`. An unknown token is 401 on every request (message "Invalid credentials in
  Authorization header", as the Hub says). Writes need a write token whose user is the namespace or a member of it
  (an org): no token → 401, read-only token or someone else's namespace → 403, each with `{"error": ...}`.
  A private repo is 404 `RepoNotFound` to anyone who may not read it.
- Errors are 4xx with `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) and `X-Error-Message`;
  a tag or branch that exists is 409 ("Tag v1 already exists"). `fail_next` makes the next matching requests fail
  with any status (413, 429 with Retry-After, 500, 503, ...), as the Hub does under load or with limits.
  A route it does not implement, or a bug in it, answers 501 (the client retries 5xx other than 501 with backoff,
  which would make tests slow instead of failing) and is kept in `HubServer.errors`.
- Every request is recorded (method, path with query, headers, body, status) in `HubServer.requests`;
  `token_leaks(token)` lists those that carry a token anywhere but the Authorization header.

Not implemented: Xet, pull requests (`create_pr`), multipart LFS, gated repos, pagination (one page), commit
`expand` details (lastCommit), Spaces runtime, discussions, and most query options of the listing endpoints.

It imports only the standard library and PyYAML, never huggingface_hub: conftest.py starts it before anything
imports the client, whose settings (HF_ENDPOINT, ...) are read at import time.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # bytes; above this a file goes through LFS, as on the Hub
# The license ids the Hub's metadata validation accepts (its error message lists them).
LICENSES = [
    "apache-2.0",
    "mit",
    "openrail",
    "bigscience-openrail-m",
    "creativeml-openrail-m",
    "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m",
    "afl-3.0",
    "artistic-2.0",
    "bsl-1.0",
    "bsd",
    "bsd-2-clause",
    "bsd-3-clause",
    "bsd-3-clause-clear",
    "c-uda",
    "cc",
    "cc0-1.0",
    "cc-by-2.0",
    "cc-by-2.5",
    "cc-by-3.0",
    "cc-by-4.0",
    "cc-by-sa-3.0",
    "cc-by-sa-4.0",
    "cc-by-nc-2.0",
    "cc-by-nc-3.0",
    "cc-by-nc-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0",
    "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0",
    "cdla-permissive-1.0",
    "cdla-permissive-2.0",
    "wtfpl",
    "ecl-2.0",
    "epl-1.0",
    "epl-2.0",
    "etalab-2.0",
    "eupl-1.1",
    "eupl-1.2",
    "agpl-3.0",
    "gfdl",
    "gpl",
    "gpl-2.0",
    "gpl-3.0",
    "lgpl",
    "lgpl-2.1",
    "lgpl-3.0",
    "isc",
    "h-research",
    "intel-research",
    "lppl-1.3c",
    "ms-pl",
    "apple-ascl",
    "apple-amlr",
    "mpl-2.0",
    "odc-by",
    "odbl",
    "openmdw-1.0",
    "openrail++",
    "osl-3.0",
    "postgresql",
    "ofl-1.1",
    "ncsa",
    "unlicense",
    "zlib",
    "pddl",
    "lgpl-lr",
    "deepfloyd-if-license",
    "fair-noncommercial-research-license",
    "llama2",
    "llama3",
    "llama3.1",
    "llama3.2",
    "llama3.3",
    "llama4",
    "grok2-community",
    "gemma",
    "unknown",
    "other",
]
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.parquet")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # before the repo id in non-API URLs
NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """An error answered as the Hub does: a status, a JSON `{"error": message}` body and the error headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.headers = headers or {}


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what `git hash-object` prints, and what the client compares regular files to."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ----- state -----


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The small text file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """A file in a commit. Its content is `objects/<sha256>`; `lfs` says how it was committed."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # sha1 of the blob, or of its LFS pointer file for an LFS file (as git stores it)

    @classmethod
    def regular(cls, data: bytes) -> Blob:
        return cls(hashlib.sha256(data).hexdigest(), len(data), False, git_blob_sha1(data))

    @classmethod
    def large(cls, sha256: str, size: int) -> Blob:
        """A file committed through LFS."""
        return cls(sha256, size, True, git_blob_sha1(lfs_pointer(sha256, size)))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    def info(self, path: str) -> dict[str, Any]:
        """The tree/paths-info entry of the file."""
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            entry["lfs"] = {
                "oid": self.sha256,
                "size": self.size,
                "pointerSize": len(lfs_pointer(self.sha256, self.size)),
            }
        return entry


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    type: str  # "model", "dataset" or "space"
    id: str  # "namespace/name"
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag, `refs/heads/...`, `refs/tags/...` or full commit sha names."""
        branch, tag = revision.removeprefix("refs/heads/"), revision.removeprefix("refs/tags/")
        oid = self.branches.get(branch) or self.tags.get(tag)
        if oid is None and COMMIT_SHA.fullmatch(revision) and revision in self.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        commit: Commit | None = self.resolve(revision)
        out = []
        while commit is not None:
            out.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return out


@dataclass
class Failure:
    """A failure to answer instead of serving (HubServer.fail_next)."""

    method: str
    path: re.Pattern[str]
    status: int
    message: str
    times: int
    headers: dict[str, str]


@dataclass(frozen=True)
class Identity:
    user: str
    can_write: bool


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it; header names are lower case."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass(frozen=True)
class Request:
    """What a route handler needs of the request being served."""

    method: str
    segments: list[str]  # the path split on "/", each part unquoted
    query: dict[str, list[str]]
    body: bytes
    base: str  # scheme and host the client used, to build URLs it can follow
    identity: Identity | None
    headers: dict[str, str]

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"the body is not JSON: {err}") from err

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # for HEAD: the length the GET would have

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


# ----- the server -----


class HubServer:
    """The server and its state. `start()` serves on 127.0.0.1 from a daemon thread; `close()` stops it and
    removes its storage.

    tokens: token -> user name. read_only: the tokens that may only read. orgs: org name -> its member users
    (members may write to the org's namespace)."""

    def __init__(
        self,
        tokens: dict[str, str],
        *,
        read_only: Iterable[str] = (),
        orgs: dict[str, set[str]] | None = None,
    ) -> None:
        read_only = set(read_only)
        self.identities = {token: Identity(user, token not in read_only) for token, user in tokens.items()}
        self.orgs = orgs or {}
        self.storage = Path(tempfile.mkdtemp(prefix="aksis-test-hub-"))
        (self.storage / "objects").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}  # (type, id) -> repo
        self.uploads: dict[str, tuple[str, int]] = {}  # one-time upload signature -> (sha256, size)
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # 501 answers: routes not implemented, or bugs in this server
        self.failures: list[Failure] = []  # answers to give instead of serving (see fail_next)
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._last_time = datetime.now(timezone.utc)
        self._http: ThreadingHTTPServer | None = None

    # --- lifecycle ---

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="hub-server", daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._http is not None, "start() the server first"
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        shutil.rmtree(self.storage, ignore_errors=True)

    # --- for tests ---

    def token_leaks(self, token: str, since: int = 0) -> list[RecordedRequest]:
        """Requests (from index `since` of `requests`) with `token` in the path, the body or any header other
        than Authorization."""
        with self.lock:
            recorded = self.requests[since:]
        return [
            r
            for r in recorded
            if token in r.path
            or token.encode() in r.body
            or any(token in value for name, value in r.headers.items() if name != "authorization")
        ]

    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        message: str,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` requests whose method is `method` and whose path (without the query) matches the
        regular expression `path` with `status` and the Hub's JSON error `message` (and `headers`, e.g.
        Retry-After), instead of serving them."""
        with self.lock:
            self.failures.append(Failure(method, re.compile(path), status, message, times, headers or {}))

    def failure_for(self, method: str, path: str) -> Failure | None:
        with self.lock:
            for failure in self.failures:
                if failure.method == method and failure.path.search(path):
                    failure.times -= 1
                    if failure.times <= 0:
                        self.failures.remove(failure)
                    return failure
        return None

    # --- permissions ---

    def may_read(self, repo: Repo, identity: Identity | None) -> bool:
        return not repo.private or (identity is not None and self.owns(identity.user, repo.namespace))

    def owns(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.orgs.get(namespace, set())

    def require_write(self, identity: Identity | None, namespace: str, what: str) -> Identity:
        if identity is None:
            raise HubError(401, f"You must be authenticated (a write token) to {what}")
        if not identity.can_write:
            raise HubError(403, f"The token of {identity.user} has read-only permissions: it cannot {what}")
        if not self.owns(identity.user, namespace):
            raise HubError(403, f"You don't have the rights to {what}: {identity.user} cannot write to {namespace}")
        return identity

    def repo(self, repo_type: str, repo_id: str, identity: Identity | None) -> Repo:
        """A repo `identity` may see; 404 RepoNotFound otherwise (a private repo does not exist for others)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or not self.may_read(repo, identity):
            raise repo_not_found(repo_id)
        return repo

    def writable_repo(self, repo_type: str, repo_id: str, identity: Identity | None, what: str) -> Repo:
        repo = self.repo(repo_type, repo_id, identity)
        self.require_write(identity, repo.namespace, what)
        return repo

    # --- objects and commits ---

    def object_path(self, sha256: str) -> Path:
        return self.storage / "objects" / sha256

    def store(self, data: bytes) -> str:
        """Keeps `data` in `objects/` (once) and gives its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha256)
        if not path.exists():
            path.write_bytes(data)
        return sha256

    def now(self) -> str:
        """A timestamp in the Hub's format (2024-05-01T12:00:00.000Z), later than any before it, so that sorting by
        date follows the order of events even within a millisecond."""
        self._last_time = max(datetime.now(timezone.utc), self._last_time + timedelta(milliseconds=1))
        return self._last_time.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def commit(self, repo: Repo, branch: str, files: dict[str, Blob], title: str, message: str, author: str) -> Commit:
        """A new commit on top of `branch` (which may not exist yet: the first commit) with exactly `files`."""
        parent = repo.branches.get(branch)
        manifest = {path: blob.sha256 for path, blob in sorted(files.items())}
        seed = json.dumps([parent, manifest, title, message, author, next(self._counter)])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, message, author, self.now(), dict(files))
        repo.branches[branch] = oid
        return repo.commits[oid]

    def card(self, commit: Commit) -> dict[str, Any]:
        """The YAML front matter of the commit's README.md ({} if none or not a mapping)."""
        blob = commit.files.get("README.md")
        if blob is None:
            return {}
        text = self.object_path(blob.sha256).read_text(encoding="utf-8", errors="replace")
        match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        try:
            data = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def info(self, repo: Repo, commit: Commit, blobs: bool) -> dict[str, Any]:
        """The repo info JSON of `repo` at `commit`, as `GET /api/models/{repo}` answers it."""
        card = self.card(commit)
        library = card.get("library_name")
        tags = card.get("tags") or []
        tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
        tags = list(dict.fromkeys(([str(library)] if library else []) + tags))
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    pointer_size = len(lfs_pointer(blob.sha256, blob.size))
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": pointer_size}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24],
            "id": repo.id,
            "modelId": repo.id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": library,
            "pipeline_tag": card.get("pipeline_tag"),
            "tags": tags,
            "cardData": card or None,
            "siblings": siblings,
            "usedStorage": sum(b.size for b in commit.files.values()),
        }


class _Handler(BaseHTTPRequestHandler):
    """Parses, authenticates and records each request, then hands it to `route`."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length
    server_state: HubServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the body back until the
        # client's delayed ACK of the headers, 40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # the request log is `requests`, not stderr
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the empty line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        hub = self.server_state
        body = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        url = urlsplit(self.path)
        crash = ""
        try:
            failure = hub.failure_for(self.command, url.path)
            if failure is not None:
                raise HubError(failure.status, failure.message, headers=failure.headers)
            identity = self._identity(headers.get("authorization"))
            request = Request(
                method=self.command,
                segments=[unquote(s) for s in url.path.split("/")[1:]],
                query=parse_qs(url.query, keep_blank_values=True),
                body=body,
                base=f"http://{headers.get('host') or hub.endpoint.removeprefix('http://')}",
                identity=identity,
                headers=headers,
            )
            with hub.lock:
                response = route(hub, request)
        except HubError as err:
            response = Response.json({"error": err.message}, err.status)
            response.headers["X-Error-Message"] = err.message
            if err.code:
                response.headers["X-Error-Code"] = err.code
            if err.commit:
                response.headers["X-Repo-Commit"] = err.commit
            response.headers.update(err.headers)
        except Exception as err:  # a bug here: answer at once (no 5xx retry loop in the client) and keep it
            crash = traceback.format_exc()
            response = Response.json({"error": f"the test Hub server crashed: {err!r}"}, 501)
        if response.status == 501:
            with hub.lock:
                hub.errors.append(f"{self.command} {self.path}: {response.body.decode()}\n{crash}".strip())
        with hub.lock:
            hub.requests.append(RecordedRequest(self.command, self.path, headers, body, response.status))
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        length = response.content_length if response.content_length is not None else len(response.body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _identity(self, authorization: str | None) -> Identity | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        identity = self.server_state.identities.get(token)
        if identity is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return identity


# ----- routes -----


def route(hub: HubServer, req: Request) -> Response:
    """Dispatch on the path segments (each already unquoted, so a revision may contain "/")."""
    s, method = req.segments, req.method
    if s[:1] == ["api"]:
        match s[1:], method:
            case ["agent-harnesses"], "GET":  # the client's registry of AI agents, for its user agent: none
                return Response.json({"standardEnvVars": [], "harnesses": {}})
            case ["whoami-v2"], "GET":
                return whoami(hub, req)
            case ["validate-yaml"], "POST":
                return validate_yaml(req)
            case ["repos", "create"], "POST":
                return create_repo(hub, req)
            case ["repos", "delete"], "DELETE":
                return delete_repo(hub, req)
            case [kind], "GET" if kind in REPO_TYPES:
                return list_repos(hub, req, REPO_TYPES[kind])
            case [kind, namespace, name, *rest], _ if kind in REPO_TYPES:
                return repo_api(hub, req, REPO_TYPES[kind], f"{namespace}/{name}", rest)
            case [kind, name], _ if kind in REPO_TYPES:  # a canonical id without namespace ("gpt2"): none here
                raise repo_not_found(name)
    elif s[:1] == ["lfs-upload"] and len(s) == 2 and method == "PUT":
        return lfs_put(hub, req, s[1])
    else:
        repo_type, rest = ("model", s) if s[:1] not in (["datasets"], ["spaces"]) else (s[0][:-1], s[1:])
        match rest, method:
            case [namespace, git, "info", "lfs", "objects", "batch"], "POST" if git.endswith(".git"):
                return lfs_batch(hub, req, repo_type, f"{namespace}/{git.removesuffix('.git')}")
            case [_, git, "info", "lfs", "objects", "verify"], "POST" if git.endswith(".git"):
                return lfs_verify(hub, req)
            case [namespace, name, "resolve", revision, *path], "GET" | "HEAD" if path:
                return resolve(hub, req, repo_type, f"{namespace}/{name}", revision, "/".join(path))
            case [name, "resolve", *_], "GET" | "HEAD":
                raise repo_not_found(name)
    return Response.json({"error": f"the test Hub server does not implement {method} /{'/'.join(s)}"}, 501)


def repo_api(hub: HubServer, req: Request, repo_type: str, repo_id: str, rest: list[str]) -> Response:
    method = req.method
    match rest, method:
        case [], "GET":
            return repo_info(hub, req, repo_type, repo_id, "main")
        case ["revision", revision], "GET":
            return repo_info(hub, req, repo_type, repo_id, revision)
        case ["tree", revision, *path], "GET":
            return tree(hub, req, repo_type, repo_id, revision, "/".join(path).strip("/"))
        case ["paths-info", revision], "POST":
            return paths_info(hub, req, repo_type, repo_id, revision)
        case ["refs"], "GET":
            return refs(hub, req, repo_type, repo_id)
        case ["commits", revision], "GET":
            return commits(hub, req, repo_type, repo_id, revision)
        case ["preupload", revision], "POST":
            return preupload(hub, req, repo_type, repo_id, revision)
        case ["commit", revision], "POST":
            return commit(hub, req, repo_type, repo_id, revision)
        case ["branch", branch], "POST" | "DELETE":
            return branch_api(hub, req, repo_type, repo_id, branch)
        case ["tag", name], "POST" | "DELETE":
            return tag_api(hub, req, repo_type, repo_id, name)
        case ["settings"], "PUT":
            return settings(hub, req, repo_type, repo_id)
    return Response.json({"error": f"the test Hub server does not implement {method} {'/'.join(rest)}"}, 501)


def whoami(hub: HubServer, req: Request) -> Response:
    if req.identity is None:
        raise HubError(401, "Invalid username or password.")
    user = req.identity.user
    role = "write" if req.identity.can_write else "read"
    return Response.json(
        {
            "type": "user",
            "id": hashlib.sha1(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user.title(),
            "orgs": [{"type": "org", "name": org} for org, members in sorted(hub.orgs.items()) if user in members],
            "auth": {"type": "access_token", "accessToken": {"displayName": f"{user}-{role}", "role": role}},
        }
    )


def metadata_errors(content: str) -> list[str]:
    """What the Hub's validation finds wrong with a README's YAML front matter (none for no front matter)."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not match:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["the metadata must be a YAML mapping"]
    errors = []
    licenses = data.get("license")
    for value in licenses if isinstance(licenses, list) else [] if licenses is None else [licenses]:
        if value not in LICENSES:
            errors.append(f'"license" must be one of [{", ".join(LICENSES)}]')
    for key in ("tags", "datasets"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be an array of strings')
    return errors


def validate_yaml(req: Request) -> Response:
    """The README front matter's errors; the client reads `errors` and `warnings` of the JSON, or (asking for
    text/plain, as `ModelCard.validate` does) the errors as lines."""
    errors = metadata_errors(str(req.json().get("content", "")))
    if not errors:
        return Response.json({"errors": [], "warnings": []})
    if "text/plain" in req.headers.get("accept", ""):
        text = "\n".join(f"- {e}" for e in errors).encode()
        return Response(400, text, {"Content-Type": "text/plain"})
    return Response.json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)


def _repo_id_of(req: Request) -> tuple[str, str]:
    """(type, id) named by a create/delete body: {"name", "organization", "type"}; no organization means the
    token's own user."""
    body = req.json()
    name = str(body.get("name") or "")
    namespace = body.get("organization") or (req.identity.user if req.identity else None)
    if namespace is None:
        raise HubError(401, "You must be authenticated to create or delete a repo")
    if not NAME.fullmatch(name) or not NAME.fullmatch(str(namespace)):
        raise HubError(400, f"invalid repo name {namespace}/{name}")
    repo_type = body.get("type") or "model"
    if repo_type not in URL_PREFIX:
        raise HubError(400, f"invalid repo type {repo_type!r}")
    return repo_type, f"{namespace}/{name}"


def create_repo(hub: HubServer, req: Request) -> Response:
    repo_type, repo_id = _repo_id_of(req)
    identity = hub.require_write(req.identity, repo_id.split("/")[0], f"create {repo_id}")
    url = f"{req.base}/{URL_PREFIX[repo_type]}{repo_id}"
    if (repo_type, repo_id) in hub.repos:
        return Response.json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
    body = req.json()
    private = body.get("visibility") == "private" or body.get("private") is True
    repo = Repo(repo_type, repo_id, private, hub.now())
    hub.store(GITATTRIBUTES.encode())
    hub.commit(
        repo, "main", {".gitattributes": Blob.regular(GITATTRIBUTES.encode())}, "initial commit", "", identity.user
    )
    hub.repos[(repo_type, repo_id)] = repo
    return Response.json({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(hub: HubServer, req: Request) -> Response:
    repo_type, repo_id = _repo_id_of(req)
    hub.writable_repo(repo_type, repo_id, req.identity, f"delete {repo_id}")
    del hub.repos[(repo_type, repo_id)]
    return Response()


def settings(hub: HubServer, req: Request, repo_type: str, repo_id: str) -> Response:
    repo = hub.writable_repo(repo_type, repo_id, req.identity, f"change the settings of {repo_id}")
    body = req.json()
    if set(body) - {"private", "visibility"}:
        return Response.json({"error": f"the test Hub server only changes visibility, not {sorted(body)}"}, 501)
    repo.private = body.get("visibility", "private" if body.get("private") else "public") == "private"
    return Response.json({})


def list_repos(hub: HubServer, req: Request, repo_type: str) -> Response:
    """`GET /api/models?author=...&filter=...&search=...&sort=...`: the main branch of each visible repo; every
    `filter` (and `library`) value must be among its tags or be its library_name. Sorted by id, or newest first by
    `sort` (lastModified or createdAt)."""
    wanted = req.query.get("filter", []) + req.query.get("library", [])
    author, search = req.query.get("author", [None])[-1], req.query.get("search", [""])[-1]
    out = []
    for (kind, repo_id), repo in sorted(hub.repos.items()):
        if kind != repo_type or not hub.may_read(repo, req.identity) or search not in repo_id:
            continue
        if author is not None and repo.namespace != author:
            continue
        info = hub.info(repo, repo.resolve("main"), blobs=False)
        if all(w in info["tags"] or w == info["library_name"] for w in wanted):
            if not req.flag("full"):
                del info["siblings"]
            out.append(info)
    sort = req.query.get("sort", [""])[-1]
    if sort in ("lastModified", "createdAt"):
        out.sort(key=lambda info: info[sort], reverse=True)
    limit = req.query.get("limit")
    return Response.json(out[: int(limit[-1])] if limit else out)


def repo_info(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
    repo = hub.repo(repo_type, repo_id, req.identity)
    return Response.json(hub.info(repo, repo.resolve(revision), blobs=req.flag("blobs")))


def _folders(files: Iterable[str]) -> set[str]:
    return {"/".join(path.split("/")[:i]) for path in files for i in range(1, path.count("/") + 1)}


def _folder_info(path: str, files: dict[str, Blob]) -> dict[str, Any]:
    inside = sorted(f"{p}:{b.git_oid}" for p, b in files.items() if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1("\n".join(inside).encode()).hexdigest(), "path": path}


def tree(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
    """The files and folders under `path` (direct children, or all of them with recursive=true), in one page."""
    repo = hub.repo(repo_type, repo_id, req.identity)
    commit = repo.resolve(revision)
    folders = _folders(commit.files)
    if path and path not in folders:
        raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", commit.oid)
    prefix = f"{path}/" if path else ""

    def listed(entry: str) -> bool:
        return entry.startswith(prefix) and (req.flag("recursive") or "/" not in entry[len(prefix) :])

    entries = [_folder_info(f, commit.files) for f in sorted(folders) if listed(f)]
    entries += [blob.info(p) for p, blob in sorted(commit.files.items()) if listed(p)]
    return Response.json(entries)


def paths_info(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
    """Info on each of the form field `paths` that exists (others are left out, as on the Hub)."""
    repo = hub.repo(repo_type, repo_id, req.identity)
    commit = repo.resolve(revision)
    form = parse_qs(req.body.decode(), keep_blank_values=True)
    if req.headers.get("content-type", "").startswith("application/json"):
        form = {"paths": req.json().get("paths", [])}
    folders = _folders(commit.files)
    out = []
    for path in form.get("paths", []):
        path = path.strip("/")
        if path in commit.files:
            out.append(commit.files[path].info(path))
        elif path in folders:
            out.append(_folder_info(path, commit.files))
    return Response.json(out)


def refs(hub: HubServer, req: Request, repo_type: str, repo_id: str) -> Response:
    repo = hub.repo(repo_type, repo_id, req.identity)

    def listed(refs: dict[str, str], kind: str) -> list[dict[str, str]]:
        return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(refs.items())]

    out: dict[str, Any] = {
        "branches": listed(repo.branches, "heads"),
        "converts": [],
        "tags": listed(repo.tags, "tags"),
    }
    if req.flag("include_prs"):
        out["pullRequests"] = []
    return Response.json(out)


def commits(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
    repo = hub.repo(repo_type, repo_id, req.identity)
    return Response.json(
        [
            {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
            for c in repo.history(revision)
        ]
    )


def _branch_of(repo: Repo, revision: str) -> str:
    """The branch a commit goes to: only branches can move (not tags or commit shas)."""
    branch = revision.removeprefix("refs/heads/")
    if branch not in repo.branches:
        repo.resolve(revision)  # 404 RevisionNotFound if it names nothing
        raise HubError(400, f"cannot commit to {revision}: it is not a branch")
    return branch


def preupload(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
    """Says for each file whether it goes in the commit body ("regular") or through LFS, and its current oid
    (the client skips a file whose oid it already has: sha1 of a regular file, sha256 of an LFS one)."""
    if req.flag("create_pr"):
        raise HubError(400, "the test Hub server does not implement pull requests (create_pr)")
    repo = hub.writable_repo(repo_type, repo_id, req.identity, f"upload to {repo_id}")
    current = repo.resolve(revision).files
    answers = []
    for f in req.json().get("files", []):
        path, size = str(f["path"]), int(f.get("size", 0))
        sample = base64.b64decode(f.get("sample") or "")
        named = any(fnmatch.fnmatch(path.rsplit("/")[-1], p) for p in LFS_PATTERNS)
        lfs = size > LFS_THRESHOLD or named or is_binary(sample)
        existing = current.get(path)
        oid = None if existing is None else existing.sha256 if existing.lfs else existing.git_oid
        answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    return Response.json({"files": answers, "commitOid": repo.resolve(revision).oid})


def is_binary(sample: bytes) -> bool:
    """Whether the start of a file looks binary: a NUL byte, or bytes that are not UTF-8 (but for a character the
    512-byte sample may cut at its end)."""
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start < len(sample) - 3
    return False


def lfs_batch(hub: HubServer, req: Request, repo_type: str, repo_id: str) -> Response:
    """Git LFS batch API, "basic" transfer: an upload URL signed for one object (no token needed on it) and a
    verify URL; no actions for an object already stored."""
    hub.writable_repo(repo_type, repo_id, req.identity, f"upload to {repo_id}")
    body = req.json()
    if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
        raise HubError(400, "the test Hub server only takes LFS uploads with the basic transfer")
    objects = []
    for obj in body.get("objects", []):
        oid, size = str(obj["oid"]), int(obj["size"])
        entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if not hub.object_path(oid).exists():
            signature = secrets.token_urlsafe(16)
            hub.uploads[signature] = (oid, size)
            verify = f"{req.base}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"
            entry["actions"] = {"upload": {"href": f"{req.base}/lfs-upload/{signature}"}, "verify": {"href": verify}}
        objects.append(entry)
    return Response.json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})


def lfs_put(hub: HubServer, req: Request, signature: str) -> Response:
    """The object's bytes, to the URL the batch answer signed; the content must match the announced oid and size."""
    if signature not in hub.uploads:
        raise HubError(403, "unknown or already used upload URL")
    oid, size = hub.uploads.pop(signature)
    if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
        raise HubError(400, f"the uploaded content does not match the announced object {oid} ({size} bytes)")
    hub.store(req.body)
    return Response()


def lfs_verify(hub: HubServer, req: Request) -> Response:
    body = req.json()
    path = hub.object_path(str(body.get("oid")))
    if not path.exists() or path.stat().st_size != body.get("size"):
        raise HubError(404, f"object {body.get('oid')} was not uploaded")
    return Response.json({})


def commit(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
    """Applies the NDJSON operations to the head of the branch and answers the new commit."""
    if req.flag("create_pr"):
        raise HubError(400, "the test Hub server does not implement pull requests (create_pr)")
    repo = hub.writable_repo(repo_type, repo_id, req.identity, f"commit to {repo_id}")
    assert req.identity is not None
    branch = _branch_of(repo, revision)
    head = repo.resolve(branch)
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "the commit body must start with a header line")
    header = lines[0]["value"]
    parent = header.get("parentCommit")
    if parent is not None and parent != head.oid:
        raise HubError(412, f"A commit has happened since {parent} ({branch} is at {head.oid}): refresh and retry")
    files = dict(head.files)
    for line in lines[1:]:
        key, value = line.get("key"), line.get("value", {})
        path = str(value.get("path", "")).strip("/")
        if key == "file":
            data = base64.b64decode(value["content"])
            errors = metadata_errors(data.decode("utf-8", errors="replace")) if path == "README.md" else []
            if errors:
                raise HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
            hub.store(data)
            files[path] = Blob.regular(data)
        elif key == "lfsFile":
            oid = str(value["oid"])
            stored = hub.object_path(oid)
            size = stored.stat().st_size if stored.exists() else -1
            if size < 0 or value.get("size", size) != size:
                raise HubError(400, f"{path}: the LFS object {oid} ({value.get('size')} bytes) was not uploaded")
            files[path] = Blob.large(oid, size)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound", head.oid)
        elif key == "deletedFolder":
            inside = [p for p in files if p.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound", head.oid)
            for p in inside:
                del files[p]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")
    new = hub.commit(repo, branch, files, header.get("summary", ""), header.get("description", ""), req.identity.user)
    url = f"{req.base}/{URL_PREFIX[repo_type]}{repo_id}/commit/{new.oid}"
    return Response.json({"success": True, "commitOid": new.oid, "commitUrl": url, "pullRequestUrl": None})


def _check_ref_name(name: str) -> None:
    if not name or name.startswith("refs/") or ".." in name or any(c in name for c in " ~^:?*[\\"):
        raise HubError(400, f"Invalid reference name: {name!r}")


def branch_api(hub: HubServer, req: Request, repo_type: str, repo_id: str, branch: str) -> Response:
    repo = hub.writable_repo(repo_type, repo_id, req.identity, f"change the branches of {repo_id}")
    if req.method == "DELETE":
        if branch == "main" or branch not in repo.branches:
            raise HubError(400 if branch == "main" else 404, f"cannot delete branch {branch!r}", "RevisionNotFound")
        del repo.branches[branch]
        return Response.json({})
    _check_ref_name(branch)
    if branch in repo.branches or branch in repo.tags:
        raise HubError(409, f"Reference already exists: {branch}")
    repo.branches[branch] = repo.resolve(str(req.json().get("startingPoint") or "main")).oid
    return Response.json({})


def tag_api(hub: HubServer, req: Request, repo_type: str, repo_id: str, name: str) -> Response:
    """POST .../tag/{revision} {"tag": ..., "message": ...} tags a revision; DELETE .../tag/{tag} removes a tag."""
    repo = hub.writable_repo(repo_type, repo_id, req.identity, f"change the tags of {repo_id}")
    if req.method == "DELETE":
        if repo.tags.pop(name, None) is None:
            raise HubError(404, f"no tag {name!r}", "RevisionNotFound")
        return Response.json({})
    tag = str(req.json().get("tag", ""))
    _check_ref_name(tag)
    if tag in repo.tags:
        raise HubError(409, f"Tag {tag} already exists")
    if tag in repo.branches:
        raise HubError(409, f"Reference already exists: {tag}")
    repo.tags[tag] = repo.resolve(name).oid
    return Response.json({})


def resolve(hub: HubServer, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
    """A file's bytes (GET, with an optional `Range: bytes=a-[b]`) or only its headers (HEAD)."""
    repo = hub.repo(repo_type, repo_id, req.identity)
    commit = repo.resolve(revision)
    blob = commit.files.get(path)
    if blob is None:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
    headers = {
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "X-Repo-Commit": commit.oid,
        "ETag": f'"{blob.etag}"',
    }
    if blob.lfs:
        headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
    if req.method == "HEAD":
        return Response(200, b"", headers, content_length=blob.size)
    data = hub.object_path(blob.sha256).read_bytes()
    ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("range", ""))
    if ranged:
        start = int(ranged.group(1))
        end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
        if start >= len(data):
            raise HubError(416, f"range {req.headers['range']} is outside the {len(data)} bytes of {path}")
        headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
        return Response(206, data[start : end + 1], headers)
    return Response(200, data, headers)
