"""A small Hugging Face Hub-compatible HTTP server, for testing pushes and pulls with the real client on loopback.

It implements the calls that huggingface_hub 2.x makes to push a folder and to download files (see
``shared/notes/hub-offline.md``), on repos held in memory:

- ``POST /api/repos/create`` (409 when the repo exists), ``POST /api/repos/delete``, ``GET /api/whoami-v2``;
- ``POST /api/validate-yaml``: parses the README's YAML front matter and rejects what the Hub rejects (not a
  mapping, tags or base_model of the wrong type);
- ``POST /api/{type}s/{repo}/preupload/{rev}``: in upload mode ``"regular"`` (the default) every file is regular
  (content goes base64 in the commit); in mode ``"lfs"`` binary files (weights) are LFS, as on the Hub, and take
  the LFS batch path (the client then needs ``HF_HUB_DISABLE_XET=1``: Xet storage cannot run locally). The answer
  carries the remote oid of each existing file, so that the client skips unchanged files;
- ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT`` to the upload href, ``POST`` verify: LFS objects are kept
  by sha256 and published by no commit until a commit names them;
- ``POST /api/{type}s/{repo}/commit/{rev}`` (ndjson: header / file / lfsFile / deletedFile / deletedFolder,
  ``parentCommit``, ``?create_pr=1``): validated completely, then applied at once, creating a new commit with the
  full file tree. A commit that fails (bad request or injected fault) changes nothing;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob sha1 for regular files,
  sha256 for LFS files, also as ``X-Linked-Etag``/``X-Linked-Size``) and ``Range``; never ``X-Xet-Hash``;
- ``GET /api/{type}s/{repo}[/revision/{rev}]``, ``.../tree/{rev}[/{path}]``, ``.../commits/{rev}``, ``.../refs``,
  ``POST .../branch/{branch}``;
- errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so that the client raises
  its typed exceptions.

Fault injection: ``server.fail("commit", status=500)`` makes the next commit call (or ``times=N`` calls, or every
call with ``times=None``) answer that status after reading the request, changing nothing. Route names: create,
validate_yaml, preupload, lfs_batch, lfs_upload, lfs_verify, commit, resolve, info, tree, commits, refs, branch.

Every request is recorded in ``server.requests`` (method, route, path, status, request body bytes); calls to routes
this server does not implement are also listed in ``server.unhandled``.

In tests::

    with HubServer(upload_mode="regular") as server:
        with client_pointed_at(server.url, hf_home=tmp_path / "hf"):
            ...  # huggingface_hub calls in this process now go to the server

As a script (only the standard library is needed; PyYAML is used to validate model cards when installed)::

    python3 tests/hub_server.py --port 8765 [--upload-mode lfs] &
    HF_ENDPOINT=http://127.0.0.1:8765 HF_HOME=$(mktemp -d) python3 examples/share_on_hub.py
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, unquote, urlsplit

UPLOAD_MODES = ("regular", "lfs")
ROUTES = (
    "create", "delete", "whoami", "validate_yaml", "preupload", "lfs_batch", "lfs_upload", "lfs_verify", "commit",
    "resolve", "info", "tree", "commits", "refs", "branch",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space"}  # URL prefix of file routes -> repo type
_DEFAULT_NAMESPACE = "user"  # the "logged-in user": owner of repos created without a namespace
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ------------------------------------------------------------------------------------------------ repository model
@dataclass(frozen=True)
class Entry:
    """A file in a commit's tree: regular (content in git) or LFS (content in the LFS store, by sha256)."""

    size: int
    content: Optional[bytes] = field(default=None, repr=False)  # regular files
    lfs_sha256: Optional[str] = None  # LFS files

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def git_oid(self) -> str:
        """git blob id: of the content, or of the LFS pointer file."""
        if self.is_lfs:
            return git_blob_sha1(_lfs_pointer(self.lfs_sha256, self.size))
        return git_blob_sha1(self.content)

    @property
    def etag(self) -> str:
        """What resolve answers as ETag and preupload as oid: git sha1 for regular files, sha256 for LFS files."""
        return self.lfs_sha256 if self.is_lfs else self.git_oid


@dataclass
class Commit:
    sha: str
    parents: list[str]
    title: str
    message: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha ("refs/pr/N" for pull requests)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo (committed or not)
    num_prs: int = 0

    def resolve(self, revision: str) -> Optional[str]:
        """A branch name, "refs/heads/<branch>", "refs/pr/N" or a full commit sha -> commit sha (None: unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in self.branches:
            return self.branches[revision[len("refs/heads/"):]]
        if revision in self.commits:
            return revision
        return None

    def history(self, sha: str) -> Iterator[Commit]:
        while sha:
            commit = self.commits[sha]
            yield commit
            sha = commit.parents[0] if commit.parents else ""


@dataclass
class RequestRecord:
    method: str
    route: str
    path: str
    status: int = 0
    body_bytes: int = 0


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to its typed exceptions."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


# ------------------------------------------------------------------------------------------------ card validation
def validate_card_metadata(content: str) -> list[str]:
    """Errors the Hub would report for a README's YAML front matter (empty: valid, or no front matter)."""
    if not content.startswith("---"):
        return []
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", content, re.DOTALL)
    if match is None:
        return ["The YAML front matter is not closed by a '---' line."]
    try:
        import yaml
    except ImportError:  # cannot check more without a YAML parser
        return []
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"Invalid YAML: {error}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["The metadata must be a YAML mapping."]
    errors = []
    for key in ("library_name", "pipeline_tag", "license"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        )):
            errors.append(f'"{key}" must be a string or a list of strings')
    base_model = metadata.get("base_model")
    if base_model is not None and not (isinstance(base_model, str) or (
        isinstance(base_model, list) and all(isinstance(item, str) for item in base_model)
    )):
        errors.append('"base_model" must be a string or a list of strings')
    return errors


def _card_metadata(content: bytes) -> dict:
    """The README's front matter as a dict (best effort: {} if absent or unparsable)."""
    try:
        import yaml

        text = content.decode()
        match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
        metadata = yaml.safe_load(match.group(1)) if match else None
        return metadata if isinstance(metadata, dict) else {}
    except Exception:
        return {}


# ------------------------------------------------------------------------------------------------ server
class HubServer:
    """The in-memory Hub and its threaded HTTP server on 127.0.0.1 (port 0: any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, upload_mode: str = "regular") -> None:
        if upload_mode not in UPLOAD_MODES:
            raise ValueError(f"upload_mode must be one of {UPLOAD_MODES}, not {upload_mode!r}")
        self.upload_mode = upload_mode
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content of every LFS upload (visible once committed)
        self.requests: list[RequestRecord] = []
        self.unhandled: list[str] = []
        self.validated_cards: list[str] = []
        self.commit_log: list[tuple[str, str, list[str]]] = []  # (repo id, new commit sha, paths it changed)
        # called as after_request(record) once a request is answered (in the server's thread): lets a test act
        # between two calls of the client
        self.after_request: Optional[Callable[[RequestRecord], None]] = None
        self._faults: dict[str, list] = {}  # route -> [status, remaining calls (None: all), message]
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.hub = self
        self._thread: Optional[threading.Thread] = None

    # --------------------------------------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close every open connection (kept-alive client connections included)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.close_all_connections()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------------- test helpers
    def fail(self, route: str, status: int = 500, times: Optional[int] = 1, message: str = "Injected failure") -> None:
        """Make the next `times` calls of `route` (None: every call) answer `status` after reading the request."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        with self._lock:
            self._faults[route] = [status, times, message]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, route: str) -> Optional[HubError]:
        with self._lock:
            fault = self._faults.get(route)
            if fault is None:
                return None
            status, remaining, message = fault
            if remaining is not None:
                if remaining <= 1:
                    del self._faults[route]
                else:
                    fault[1] = remaining - 1
            return HubError(status, message)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha that `revision` resolves to."""
        with self._lock:
            sha = self.repo(repo_id, repo_type).resolve(revision)
            if sha is None:
                raise KeyError(revision)
            return sha

    def commit_shas(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """The history of `revision`, newest first (the repo's initial commit last)."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            return [commit.sha for commit in repo.history(self.head(repo_id, revision, repo_type))]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The content of every file at `revision`."""
        with self._lock:
            commit = self.repo(repo_id, repo_type).commits[self.head(repo_id, revision, repo_type)]
            return {path: self._content(entry) for path, entry in commit.files.items()}

    def entries(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Entry]:
        with self._lock:
            return dict(self.repo(repo_id, repo_type).commits[self.head(repo_id, revision, repo_type)].files)

    def requests_to(self, *routes: str) -> list[RequestRecord]:
        with self._lock:
            return [record for record in self.requests if record.route in routes]

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unhandled.clear()

    def _content(self, entry: Entry) -> bytes:
        return self.lfs_objects[entry.lfs_sha256] if entry.is_lfs else entry.content

    # --------------------------------------------------------------------------------------------- repo operations
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key]
            repo = Repo(repo_type, repo_id, private, _now())
            initial = self._new_commit(repo, [], "initial commit", "", {".gitattributes": Entry(
                len(_GITATTRIBUTES), content=_GITATTRIBUTES)})
            repo.branches["main"] = initial.sha
            self.repos[key] = repo
            return repo

    def _new_commit(self, repo: Repo, parents: list[str], title: str, message: str, files: dict[str, Entry]) -> Commit:
        self._commit_counter += 1
        digest = hashlib.sha1()
        header = [repo.repo_type, repo.repo_id, parents, title, message, self._commit_counter]
        digest.update(json.dumps(header).encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].git_oid}\0".encode())
        commit = Commit(digest.hexdigest(), parents, title, message, _now(), files)
        repo.commits[commit.sha] = commit
        return commit

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found(repo_id)
        return repo


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------------------------------------ request handling
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "peft-childtuning-test-hub/1.0"
    timeout = 60  # an idle kept-alive connection is dropped after this many seconds
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet; see HubServer.requests
        if os.environ.get("HUB_SERVER_VERBOSE"):
            sys.stderr.write(f"hub-server: {format % args}\n")

    # --------------------------------------------------------------------------------------------- plumbing
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def base_url(self) -> str:
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        return f"http://{host}"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline().strip().split(b";")[0]
                size = int(size_line or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._record.status = status

    def _json(self, status: int, payload: Any, headers: Optional[dict] = None,
              content_type: str = "application/json") -> None:
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    def _error(self, error: HubError) -> None:
        headers = dict(error.headers)
        if error.code:
            headers["X-Error-Code"] = error.code
        headers["X-Error-Message"] = error.message
        self._json(error.status, {"error": error.message}, headers)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        raw_segments = [segment for segment in split.path.split("/")]
        segments = [unquote(segment) for segment in raw_segments[1:]]
        self._record = RequestRecord(method, "unknown", self.path)
        body = b""
        try:
            body = self._read_body() if method in ("POST", "PUT") else b""
            self._record.body_bytes = len(body)
            route, handler, args = self._route(method, segments)
            self._record.route = route
            if handler is None:
                with self.hub._lock:
                    self.hub.unhandled.append(f"{method} {self.path}")
                raise HubError(404, f"Not implemented by the test Hub: {method} {split.path}")
            fault = self.hub._take_fault(route)
            if fault is not None:
                raise fault
            handler(*args, query=query, body=body)
        except HubError as error:
            self._error(error)
        except Exception as error:  # a server bug: answer 500 rather than hang the client
            self._error(HubError(500, f"Test Hub error: {type(error).__name__}: {error}"))
        finally:
            with self.hub._lock:
                self.hub.requests.append(self._record)
            hook = self.hub.after_request
            if hook is not None:
                hook(self._record)

    def _route(self, method: str, s: list[str]) -> tuple[str, Any, tuple]:
        """(route name, handler, handler args) for the request path segments."""
        if s[:1] == ["api"]:
            if s[1:3] == ["repos", "create"] and method == "POST":
                return "create", self._create_repo, ()
            if s[1:3] == ["repos", "delete"] and method in ("POST", "DELETE"):
                return "delete", self._delete_repo, ()
            if s[1:2] == ["whoami-v2"]:
                return "whoami", self._whoami, ()
            if s[1:2] == ["validate-yaml"] and method == "POST":
                return "validate_yaml", self._validate_yaml, ()
            if len(s) >= 4 and s[1] in ("models", "datasets", "spaces"):
                repo_type, repo_id, rest = s[1][:-1], f"{s[2]}/{s[3]}", s[4:]
                if not rest and method == "GET":
                    return "info", self._info, (repo_type, repo_id, None)
                action, tail = rest[0], rest[1:]
                if action == "revision" and method == "GET" and tail:
                    return "info", self._info, (repo_type, repo_id, "/".join(tail))
                if action == "preupload" and method == "POST" and tail:
                    return "preupload", self._preupload, (repo_type, repo_id, "/".join(tail))
                if action == "commit" and method == "POST" and tail:
                    return "commit", self._commit, (repo_type, repo_id, "/".join(tail))
                if action == "tree" and method == "GET" and tail:
                    return "tree", self._tree, (repo_type, repo_id, tail[0], "/".join(tail[1:]))
                if action == "commits" and method == "GET" and tail:
                    return "commits", self._commits, (repo_type, repo_id, "/".join(tail))
                if action == "refs" and method == "GET":
                    return "refs", self._refs, (repo_type, repo_id)
                if action == "branch" and method == "POST" and tail:
                    return "branch", self._create_branch, (repo_type, repo_id, "/".join(tail))
            return "unknown", None, ()
        if s[:1] == ["_lfs"]:
            if s[1:2] == ["verify"] and method == "POST" and len(s) >= 5:
                return "lfs_verify", self._lfs_verify, (s[2], f"{s[3]}/{s[4]}")
            if method == "PUT" and len(s) == 5:
                return "lfs_upload", self._lfs_upload, (s[1], f"{s[2]}/{s[3]}", s[4])
            return "unknown", None, ()
        repo_type = "model"
        if s and s[0] in _REPO_TYPE_PREFIXES:
            repo_type, s = _REPO_TYPE_PREFIXES[s[0]], s[1:]
        if len(s) >= 4 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return "resolve", self._resolve, (repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if s[1:] and s[1].endswith(".git") and s[2:6] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return "lfs_batch", self._lfs_batch, (repo_type, f"{s[0]}/{s[1][:-4]}")
        return "unknown", None, ()

    def _repo_url(self, repo: Repo) -> str:
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo.repo_type]
        return f"{self.base_url}/{prefix}{repo.repo_id}"

    # --------------------------------------------------------------------------------------------- repos
    def _create_repo(self, *, query: dict, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        name, namespace = payload.get("name"), payload.get("organization") or _DEFAULT_NAMESPACE
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        if repo_type not in ("model", "dataset", "space"):
            raise HubError(400, f"Invalid repo type: {repo_type}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo_id = f"{namespace}/{name}"
        with self.hub._lock:
            exists = (repo_type, repo_id) in self.hub.repos
            repo = self.hub.create_repo(repo_id, repo_type, private)
        if exists:
            self._json(409, {"error": f"You already created this {repo_type} repo", "url": self._repo_url(repo)})
        else:
            self._json(200, {"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, *, query: dict, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or _DEFAULT_NAMESPACE}/{payload.get('name')}"
        with self.hub._lock:
            if self.hub.repos.pop((payload.get("type") or "model", repo_id), None) is None:
                raise _repo_not_found(repo_id)
        self._json(200, {})

    def _whoami(self, *, query: dict, body: bytes) -> None:
        self._json(200, {"type": "user", "name": _DEFAULT_NAMESPACE, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _validate_yaml(self, *, query: dict, body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        with self.hub._lock:
            self.hub.validated_cards.append(content)
        errors = validate_card_metadata(content)
        if errors:
            self._json(400, {"errors": [{"message": error} for error in errors], "warnings": []})
        else:
            self._json(200, {"errors": [], "warnings": []})

    def _info(self, repo_type: str, repo_id: str, revision: Optional[str], *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            sha = repo.resolve(revision or "main")
            if sha is None:
                raise _revision_not_found(revision)
            commit = repo.commits[sha]
            readme = commit.files.get("README.md")
            card = _card_metadata(self.hub._content(readme)) if readme is not None else {}
            siblings = [{"rfilename": path, "size": entry.size} for path, entry in sorted(commit.files.items())]
        tags = card.get("tags") if isinstance(card.get("tags"), list) else []
        self._json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": sha, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": tags,
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
            "cardData": card or None, "siblings": siblings,
        })

    def _refs(self, repo_type: str, repo_id: str, *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                        for name, sha in repo.branches.items() if not name.startswith("refs/pr/")]
            prs = [{"name": name, "ref": name, "targetCommit": sha}
                   for name, sha in repo.branches.items() if name.startswith("refs/pr/")]
        payload = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs"):
            payload["pullRequests"] = prs
        self._json(200, payload)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, *, query: dict, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint") or "main"
            sha = repo.resolve(start)
            if sha is None:
                raise _revision_not_found(start)
            repo.branches[branch] = sha
        self._json(200, {})

    def _commits(self, repo_type: str, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            sha = repo.resolve(revision)
            if sha is None:
                raise _revision_not_found(revision)
            history = [{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                        "authors": [{"user": _DEFAULT_NAMESPACE}]} for c in repo.history(sha)]
        self._json(200, history)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, *, query: dict, body: bytes) -> None:
        recursive = query.get("recursive", "").lower() in ("1", "true")
        path = path.strip("/")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            sha = repo.resolve(revision)
            if sha is None:
                raise _revision_not_found(revision)
            files = repo.commits[sha].files
        prefix = f"{path}/" if path else ""
        if path and path not in files and not any(name.startswith(prefix) for name in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        listing, folders = [], set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            relative = name[len(prefix):].split("/")
            for depth in range(1, len(relative)):
                folders.add(prefix + "/".join(relative[:depth]) if recursive or depth == 1 else None)
            if recursive or len(relative) == 1:
                entry = files[name]
                item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": name}
                if entry.is_lfs:
                    item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size,
                                   "pointerSize": len(_lfs_pointer(entry.lfs_sha256, entry.size))}
                listing.append(item)
        folders.discard(None)
        listing += [{"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
                    for folder in sorted(folders)]
        self._json(200, listing)

    # --------------------------------------------------------------------------------------------- downloads
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, *, query: dict, body: bytes) -> None:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            sha = repo.resolve(revision)
            if sha is None:
                raise _revision_not_found(revision)
            entry = repo.commits[sha].files.get(path)
            if entry is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
            content = self.hub._content(entry)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            headers.update({"X-Linked-Etag": f'"{entry.etag}"', "X-Linked-Size": str(entry.size)})
        status = 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if match and self.command == "GET" and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(content) - 1
            else:  # suffix range: the last N bytes
                start, end = max(len(content) - int(match.group(2)), 0), len(content) - 1
            if start >= len(content):
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(content)}"})
            end = min(end, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        self._send(status, content, headers, "application/octet-stream")

    # --------------------------------------------------------------------------------------------- uploads
    def _upload_mode(self, path: str, size: int, sample: bytes) -> str:
        """Mode "regular": every file. Mode "lfs": as the Hub does, LFS for binary files (weights, or a NUL byte in
        the first 512 bytes), regular for text files (config, model card)."""
        if self.hub.upload_mode == "regular" or size == 0:
            return "regular"
        binary = path.endswith(_LFS_SUFFIXES) or b"\0" in sample
        return "lfs" if binary else "regular"

    def _preupload(self, repo_type: str, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            sha = repo.resolve(revision)
            if sha is None:
                raise _revision_not_found(revision)
            files = repo.commits[sha].files
            answer = []
            for item in payload.get("files", []):
                existing = files.get(item["path"])
                mode = self._upload_mode(item["path"], item["size"], base64.b64decode(item.get("sample") or ""))
                answer.append({"path": item["path"], "uploadMode": mode,
                               "shouldIgnore": False, "oid": existing.etag if existing is not None else None})
        self._json(200, {"files": answer, "commitOid": sha})

    def _lfs_batch(self, repo_type: str, repo_id: str, *, query: dict, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is implemented")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "Only the basic transfer is implemented")
        namespace, name = repo_id.split("/")
        objects = []
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            for item in payload.get("objects", []):
                oid, size = item["oid"], item["size"]
                stored = self.hub.lfs_objects.get(oid)
                if oid in repo.lfs_oids and stored is not None and len(stored) == size:
                    objects.append({"oid": oid, "size": size})  # already there: nothing to upload
                    continue
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.base_url}/_lfs/{repo_type}/{namespace}/{name}/{oid}"},
                    "verify": {"href": f"{self.base_url}/_lfs/verify/{repo_type}/{namespace}/{name}"},
                }})
        self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str, *, query: dict, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"The uploaded content does not match its sha256 {oid}")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            self.hub.lfs_objects[oid] = body
            repo.lfs_oids.add(oid)
        self._send(200)

    def _lfs_verify(self, repo_type: str, repo_id: str, *, query: dict, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            stored = self.hub.lfs_objects.get(payload.get("oid")) if payload.get("oid") in repo.lfs_oids else None
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self._json(200, {})

    def _commit(self, repo_type: str, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Malformed ndjson commit payload: {error}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0].get("value") or {}
        create_pr = query.get("create_pr") in ("1", "true", "True")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            if create_pr:
                base_sha = repo.resolve(revision)
                if base_sha is None:
                    raise _revision_not_found(revision)
            else:
                if revision not in repo.branches:  # commits go onto branches (or pull request refs) only
                    raise _revision_not_found(revision)
                base_sha = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent is not None and parent != base_sha:
                raise HubError(412, f"A commit has happened since {parent}: {revision} is now at {base_sha}")
            files = dict(repo.commits[base_sha].files)
            # validate and apply on a copy: a bad operation leaves the repo untouched
            changed = []
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"Invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    content = base64.b64decode(value.get("content", ""))
                    files[path] = Entry(len(content), content=content)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    stored = self.hub.lfs_objects.get(oid) if oid in repo.lfs_oids else None
                    if stored is None:
                        raise HubError(422, f"LFS object {oid} for {path} was never uploaded")
                    files[path] = Entry(len(stored), lfs_sha256=oid)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [name for name in files if name.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for name in doomed:
                        del files[name]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
                changed.append(path)
            commit = self.hub._new_commit(repo, [base_sha], header.get("summary") or "Commit",
                                          header.get("description") or "", files)
            pr_url = None
            if create_pr:
                repo.num_prs += 1
                target = f"refs/pr/{repo.num_prs}"
                pr_url = f"{self._repo_url(repo)}/discussions/{repo.num_prs}"
            else:
                target = revision
            repo.branches[target] = commit.sha
            self.hub.commit_log.append((repo_id, commit.sha, changed))
        self._json(200, {"success": True, "commitOid": commit.sha, "commitUrl": f"{self._repo_url(repo)}/commit/"
                         f"{commit.sha}", "pullRequestUrl": pr_url, "hookOutput": ""})


# ------------------------------------------------------------------------------------------------ in-process client
_HOME_CONSTANTS = {
    "HF_HOME": "", "HF_HUB_CACHE": "hub", "HF_ASSETS_CACHE": "assets", "HF_TOKEN_PATH": "token",
    "HF_STORED_TOKENS_PATH": "stored_tokens", "HF_XET_CACHE": "xet",
}


@contextlib.contextmanager
def client_pointed_at(endpoint: str, hf_home: "os.PathLike[str] | str", *, disable_xet: bool = False) -> Iterator[None]:
    """Point this process's huggingface_hub at `endpoint`, with its own HF_HOME, online, for the duration.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import, into
    `huggingface_hub.constants` and into the module-level `HfApi` behind its functions (`file_exists`, ...), and
    transformers keeps the `HfApi` of its first Hub call. A test process has imported them long before, so this sets
    those values (and the environment, for code that reads it) and restores everything on exit. A process started
    with HF_ENDPOINT in its environment needs none of this.
    """
    from huggingface_hub import constants, hf_api

    endpoint = endpoint.rstrip("/")
    hf_home = os.fspath(hf_home)
    saved_attrs: list[tuple[Any, str, Any]] = []
    saved_env: dict[str, Optional[str]] = {}

    def set_attr(obj: Any, name: str, value: Any) -> None:
        saved_attrs.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def set_env(name: str, value: Optional[str]) -> None:
        saved_env.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    try:
        set_attr(constants, "ENDPOINT", endpoint)
        set_attr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        set_attr(hf_api.api, "endpoint", endpoint)
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            set_attr(transformers_hub, "_hf_api", None)  # transformers keeps the HfApi of its first Hub call
        set_attr(constants, "HF_HUB_OFFLINE", False)
        set_attr(constants, "HF_HUB_DISABLE_XET", disable_xet)
        for name, relative in _HOME_CONSTANTS.items():
            if hasattr(constants, name):
                set_attr(constants, name, os.path.join(hf_home, relative) if relative else hf_home)
        set_env("HF_ENDPOINT", endpoint)
        set_env("HF_HOME", hf_home)
        set_env("HF_HUB_CACHE", None)
        set_env("HF_HUB_OFFLINE", "0")
        set_env("TRANSFORMERS_OFFLINE", "0")
        set_env("HF_HUB_DISABLE_XET", "1" if disable_xet else None)
        set_env("HF_TOKEN", None)  # never send a real token to the test server
        yield
    finally:
        for obj, name, value in reversed(saved_attrs):
            setattr(obj, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_port() -> int:
    """A port nobody listens on right now (for a "Hub is down" endpoint)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------------ script
def _raise_keyboard_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="A Hub-compatible test server (in memory) on 127.0.0.1.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (printed)")
    parser.add_argument("--upload-mode", choices=UPLOAD_MODES, default="regular",
                        help="what preupload answers: regular (default) or lfs (client needs HF_HUB_DISABLE_XET=1)")
    args = parser.parse_args(argv)
    server = HubServer(args.host, args.port, upload_mode=args.upload_mode)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"Hub server listening on {server.url} (upload mode {args.upload_mode})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.close_all_connections()
        server._httpd.server_close()


if __name__ == "__main__":
    main()
