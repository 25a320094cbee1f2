"""A minimal Hugging Face Hub-compatible HTTP server for tests (standard library only).

It implements exactly the subset of the Hub's HTTP API that `huggingface_hub` 2.4 calls for: repositories
(create/delete/info), branches and refs, tree listings (paginated), preupload + the NDJSON commit endpoint (every file
is a "regular" upload, so no LFS or Xet is involved), and file downloads (GET/HEAD on /resolve/) with the headers
`hf_hub_download` needs. Storage is in memory; every commit keeps a full snapshot, so old commits stay readable by sha.

Why a server and not mocks: the code under test must keep the real Hub path (`create_commit`, `hf_hub_download`,
`PeftModel.from_pretrained(base, repo_id)`), and only a real HTTP endpoint exercises what the client really sends.

What it does NOT implement: LFS/Xet uploads and downloads (preupload always answers "regular"; an `lfsFile` commit
line is refused), tags, short commit shas, `list_repo_commits`, `expand=True` tree metadata (lastCommit, security),
gated repos, discussions/PR endpoints beyond creating `refs/pr/N` through `create_commit(create_pr=True)`,
`CommitOperationCopy` of LFS files, README metadata validation (`/api/validate-yaml` accepts everything), Spaces
runtime endpoints, redirects/CDN. Unknown routes answer 501 and are recorded in `HubServer.unhandled`; handler
exceptions answer 400 (never 5xx, which the client would retry with back-off) and are recorded in
`HubServer.errors`. The `hub_server` fixture fails a test that left either list non-empty.

Faults, for the tests of what a client does when the network or the server misbehaves: `HubServer.inject(action,
method, path)` makes requests whose method matches and whose URL path matches the regex answer with a 500, stall
(never answer, until the server stops or `release_stalls()`), stall half-way through the body, send a shortened
body, or answer late; see `Fault`. Each fault counts its `hits`, so a test can wait until a client is in the middle
of a download.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a regular file: what the Hub sends as ETag and tree/preupload `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    """An HTTP error answer; `code` goes to X-Error-Code, which the client maps to its exception classes."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]  # full snapshot: path -> content
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch name or "refs/pr/N" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    n_prs: int = 0

    def resolve(self, revision: str) -> Commit:
        """A branch, a PR ref or a full commit sha -> the commit (404 RevisionNotFound otherwise)."""
        oid = self.refs.get(revision) or (revision if SHA_RE.match(revision) and revision in self.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def add_commit(self, parent: Commit | None, files: dict[str, bytes], title: str, description: str = "") -> Commit:
        commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], parent.oid if parent else None, title, description, files)
        self.commits[commit.oid] = commit
        return commit


FAULT_ACTIONS = ("500", "stall", "stall_body", "short", "delay")


@dataclass
class Fault:
    """One injected misbehaviour. `action`:

    - "500": answer 500 without doing anything (the client may retry it);
    - "stall": read nothing, answer nothing, until `release_stalls()`/`stop()` or `seconds` pass, then drop the
      connection (a server that accepted the connection and hung);
    - "stall_body": do the request, send the headers and the first half of the body, then stall as above (a
      download cut in the middle);
    - "short": do the request, then send only the first half of the body with a matching Content-Length (a truncated
      file served consistently: only checking the content can tell);
    - "delay": wait `seconds`, then answer normally (a slow server; makes concurrent requests overlap).

    It hits the first `times` matching requests (all of them when None); `hits` counts them.
    """

    action: str
    method: str
    path: re.Pattern[str]
    times: int | None = None
    seconds: float = 30.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method) and self.path.search(path) is not None
                and (self.times is None or self.hits < self.times))


@dataclass
class HubState:
    """Everything the server stores; guarded by `lock` (ThreadingHTTPServer answers requests concurrently)."""

    url: str = ""
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> {"name": user, "orgs": [...]}
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)  # (repo_type, repo_id) -> Repo
    require_token: bool = False
    page_size: int = 1000
    requests: list[tuple[str, str]] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # set: stalled requests give up
    lock: threading.RLock = field(default_factory=threading.RLock)


class Request:
    """One parsed HTTP request, handed to a route."""

    def __init__(self, handler: BaseHTTPRequestHandler, state: HubState, params: dict[str, str]):
        split = urlsplit(handler.path)
        self.method, self.path, self.params = handler.command, split.path, params
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.headers = handler.headers
        length = int(handler.headers.get("Content-Length") or 0)
        self.body = handler.rfile.read(length) if length else b""
        self.state = state
        self.user = self._user()

    def _user(self) -> dict[str, Any] | None:
        auth = self.headers.get("authorization") or ""
        if not auth:
            if self.state.require_token:
                raise HubError(401, "Authorization header is required: pass a token")
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def namespaces(self) -> set[str]:
        return {self.user["name"], *self.user.get("orgs", ())} if self.user else set()

    def repo(self, write: bool = False) -> Repo:
        """The repo named by the URL, or the 404 (private repos are invisible to strangers, as on the Hub)."""
        repo_type = API_TYPES.get(self.params.get("type", "models"), "model")
        repo_id = f"{self.params['ns']}/{self.params['name']}"
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self.params["ns"] not in self.namespaces()):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if write:
            self.require_write(self.params["ns"])
        return repo

    def require_write(self, namespace: str) -> None:
        if self.user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if namespace not in self.namespaces():
            raise HubError(403, f"You don't have the rights to write in the namespace {namespace!r}")


Answer = tuple[int, dict[str, str], bytes]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


# ---------------------------------------------------------------------------------------------------- routes


def whoami(req: Request) -> Answer:
    if req.user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    user = req.user
    return _json({"type": "user", "id": user["name"], "name": user["name"], "fullname": user["name"],
                  "orgs": [{"name": o, "type": "org"} for o in user.get("orgs", ())],
                  "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})


def create_repo(req: Request) -> Answer:
    payload = req.json()
    if req.user is None:
        raise HubError(401, "You must be authenticated to create a repo")
    namespace = payload.get("organization") or req.user["name"]
    name, repo_type = payload.get("name") or "", payload.get("type") or "model"
    if repo_type not in URL_PREFIX or not NAME_RE.match(name) or "--" in name or ".." in name:
        raise HubError(400, f"Invalid repo name {name!r} or type {repo_type!r}")
    req.require_write(namespace)
    repo_id = f"{namespace}/{name}"
    url = f"{req.state.url}/{URL_PREFIX[repo_type]}{repo_id}"
    if (repo_type, repo_id) in req.state.repos:
        return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
    repo = Repo(repo_id, repo_type, private=payload.get("visibility") == "private" or bool(payload.get("private")))
    repo.refs["main"] = repo.add_commit(None, {".gitattributes": GITATTRIBUTES}, "initial commit").oid
    req.state.repos[(repo_type, repo_id)] = repo
    return _json({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})


def delete_repo(req: Request) -> Answer:
    payload = req.json()
    namespace = payload.get("organization") or (req.user or {}).get("name")
    key = (payload.get("type") or "model", f"{namespace}/{payload.get('name')}")
    if key not in req.state.repos or (req.state.repos[key].private and namespace not in req.namespaces()):
        raise HubError(404, f"Repository not found: {key[1]}", "RepoNotFound")
    req.require_write(namespace)
    del req.state.repos[key]
    return _json({})


def validate_yaml(req: Request) -> Answer:
    return _json({"errors": [], "warnings": []})


def agent_harnesses(req: Request) -> Answer:
    """The registry huggingface_hub fetches (once a day, cached under HF_HOME) to fill its user-agent."""
    return _json({"standardEnvVars": [], "harnesses": {}})


def repo_info(req: Request) -> Answer:
    repo = req.repo()
    commit = repo.resolve(unquote(req.params.get("rev") or "main"))
    blobs = req.query.get("blobs", "").lower() in ("1", "true")
    siblings = [
        {"rfilename": p, **({"size": len(d), "blobId": git_blob_sha1(d)} if blobs else {})}
        for p, d in sorted(commit.files.items())
    ]
    info = {"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
            "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
    if repo.repo_type == "model":
        info["modelId"] = repo.repo_id
    return _json(info)


def list_refs(req: Request) -> Answer:
    repo = req.repo()

    def ref(name: str, oid: str) -> dict[str, str]:
        return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}", "targetCommit": oid}

    branches = [ref(n, o) for n, o in repo.refs.items() if not n.startswith("refs/pr/")]
    prs = [ref(n, o) for n, o in repo.refs.items() if n.startswith("refs/pr/")]
    return _json({"branches": branches, "converts": [], "tags": [],
                  **({"pullRequests": prs} if req.query.get("include_prs") else {})})


def branch(req: Request) -> Answer:
    repo = req.repo(write=True)
    name = unquote(req.params["branch"])
    if req.method == "DELETE":
        if name == "main" or name not in repo.refs:
            raise HubError(404 if name != "main" else 403, f"Cannot delete branch {name!r}",
                           "RevisionNotFound" if name != "main" else None)
        del repo.refs[name]
        return _json({})
    if not BRANCH_RE.match(name) or name.startswith("refs/") or ".." in name:
        raise HubError(400, f"Invalid branch name {name!r}")
    if name in repo.refs:
        raise HubError(409, f"Reference already exists: refs/heads/{name}")
    repo.refs[name] = repo.resolve(req.json().get("startingPoint") or "main").oid
    return _json({})


def tree(req: Request) -> Answer:
    repo = req.repo()
    commit = repo.resolve(unquote(req.params["rev"]))
    base = unquote(req.params.get("path") or "").strip("/")
    recursive = req.query.get("recursive", "").lower() in ("1", "true")
    prefix = f"{base}/" if base else ""
    under = {p: d for p, d in commit.files.items() if p.startswith(prefix)}
    if base and not under:
        raise HubError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
    entries: dict[str, dict[str, Any]] = {}
    for path, data in under.items():
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):  # the folders on the way
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                                   "path": folder}
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
    items = [entries[k] for k in sorted(entries)]
    start = int(req.query.get("cursor") or 0)
    page, headers = items[start:start + req.state.page_size], {}
    if start + req.state.page_size < len(items):
        query = {**req.query, "cursor": str(start + req.state.page_size)}
        headers["Link"] = f'<{req.state.url}{req.path}?{urlencode(query)}>; rel="next"'
    return _json(page, headers=headers)


def preupload(req: Request) -> Answer:
    repo = req.repo(write=True)
    commit = repo.resolve(unquote(req.params["rev"]))
    files = [
        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
         "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None}
        for f in req.json().get("files", [])
    ]
    return _json({"files": files, "commitOid": commit.oid})


def commit(req: Request) -> Answer:
    """NDJSON: a header line, then one line per operation. All operations apply or none (atomic)."""
    repo = req.repo(write=True)
    revision = unquote(req.params["rev"])
    create_pr = req.query.get("create_pr") in ("1", "true")
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "The first NDJSON line must be the commit header")
    header = lines[0]["value"]
    if revision not in repo.refs and not create_pr:
        repo.resolve(revision)  # 404 RevisionNotFound for an unknown name
        raise HubError(400, f"Cannot commit to {revision!r}: commits go to a branch, not to a commit sha")
    base = repo.resolve(revision)
    if header.get("parentCommit") and header["parentCommit"] != base.oid:
        raise HubError(412, "A commit has happened since. Please refresh and try again.")
    files = _apply_operations(dict(base.files), lines[1:])
    new = repo.add_commit(base, files, header.get("summary") or "", header.get("description") or "")
    url = f"{req.state.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"
    pr_url = None
    if create_pr:
        repo.n_prs += 1
        repo.refs[f"refs/pr/{repo.n_prs}"] = new.oid
        pr_url = f"{url}/discussions/{repo.n_prs}"
    else:
        repo.refs[revision] = new.oid
    return _json({"success": True, "commitOid": new.oid, "commitUrl": f"{url}/commit/{new.oid}", "hookOutput": "",
                  "pullRequestUrl": pr_url})


def _apply_operations(files: dict[str, bytes], operations: list[dict[str, Any]]) -> dict[str, bytes]:
    for op in operations:
        key, value = op.get("key"), op.get("value") or {}
        path = _check_path(value.get("path", ""))
        if key == "file":
            content = value.get("content", "")
            files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        elif key == "lfsFile":
            raise HubError(400, "This test server stores regular files only (preupload never answers 'lfs')")
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")
    return files


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.rstrip("/").split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def resolve_file(req: Request) -> Answer:
    repo = req.repo()
    commit = repo.resolve(unquote(req.params["rev"]))
    path = unquote(req.params["path"])
    headers = {"X-Repo-Commit": commit.oid}
    if path not in commit.files:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
    data = commit.files[path]
    headers.update({"ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream"})
    status, body = 200, data
    match = re.match(r"bytes=(\d+)-(\d*)$", req.headers.get("Range") or "")
    if match and data:
        first = int(match.group(1))
        last = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        status, body = 206, data[first:last + 1]
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    return status, headers, body


_REPO = r"/api/(?P<type>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], Callable[[Request], Answer]]] = [
    (m, re.compile(p + "$"), f)
    for m, p, f in [
        ("GET", r"/api/whoami-v2", whoami),
        ("POST", r"/api/repos/create", create_repo),
        ("DELETE", r"/api/repos/delete", delete_repo),
        ("POST", r"/api/validate-yaml", validate_yaml),
        ("GET", r"/api/agent-harnesses", agent_harnesses),
        ("GET", _REPO + r"/refs", list_refs),
        ("POST", _REPO + r"/branch/(?P<branch>[^/]+)", branch),
        ("DELETE", _REPO + r"/branch/(?P<branch>[^/]+)", branch),
        ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", tree),
        ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", preupload),
        ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", commit),
        ("GET", _REPO + r"/revision/(?P<rev>[^/]+)", repo_info),
        ("GET", _REPO, repo_info),
        ("GET", r"/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
         resolve_file),
        ("HEAD", r"/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
         resolve_file),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    state: HubState  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test output is for assertions
        pass

    def _fault(self, path: str) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.matches(self.command, path):
                    fault.hits += 1
                    return fault
        return None

    def _stall(self, fault: Fault) -> None:
        """Hold the connection open without a byte more, then drop it (the client sees a read timeout)."""
        self.state.release.wait(fault.seconds)
        self.close_connection = True

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        with self.state.lock:
            self.state.requests.append((self.command, path))
        fault = self._fault(path)
        if fault is not None and fault.action == "stall":
            return self._stall(fault)
        if fault is not None and fault.action == "delay":
            self.state.release.wait(fault.seconds)
        if fault is not None and fault.action == "500":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": "injected server error"}).encode()
            self.send_response(500)
            for key, value in {"Content-Type": "application/json", "X-Error-Message": "injected server error",
                               "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return None
        status, headers, body = 501, {}, b""
        for method, pattern, route in ROUTES:
            match = pattern.match(path)
            if method == self.command and match:
                try:
                    params = {k: v for k, v in match.groupdict().items() if v is not None}
                    with self.state.lock:
                        status, headers, body = route(Request(self, self.state, params))
                except HubError as e:
                    status, headers, body = _json({"error": e.message}, e.status, {
                        "X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers})
                except Exception:  # a server bug: answer 400 (a 5xx would be retried) and make the test fail
                    self.state.errors.append(f"{self.command} {self.path}\n{traceback.format_exc()}")
                    status, headers, body = _json({"error": "test server error"}, 400)
                break
        else:
            self.state.unhandled.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, headers, body = _json({"error": f"not implemented by the test Hub server: {self.command} {path}"}, 501)
        if fault is not None and fault.action == "short" and self.command != "HEAD":
            body = body[: len(body) // 2]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return None
        if fault is not None and fault.action == "stall_body":
            try:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
            except OSError:  # the client went away (a killed process): nothing to stall for
                pass
            return self._stall(fault)
        self.wfile.write(body)
        return None

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


class HubServer:
    """The server plus ways to inspect what it stores. `start()` binds 127.0.0.1 on a free port."""

    def __init__(self, user: str = "tester", token: str = "hf_test_token", orgs: tuple[str, ...] = ("peft-ext-org",)):
        self.state = HubState()
        self.user, self.token = user, token
        self.add_token(token, user, orgs)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_token(self, token: str, user: str, orgs: tuple[str, ...] = ()) -> None:
        self.state.tokens[token] = {"name": user, "orgs": list(orgs)}

    @property
    def url(self) -> str:
        return self.state.url

    @property
    def require_token(self) -> bool:
        return self.state.require_token

    @require_token.setter
    def require_token(self, value: bool) -> None:
        self.state.require_token = value

    @property
    def unhandled(self) -> list[str]:
        return self.state.unhandled

    @property
    def errors(self) -> list[str]:
        return self.state.errors

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.state.requests

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.state.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def inject(self, action: str, method: str, path: str, *, times: int | None = None,
               seconds: float = 30.0) -> Fault:
        """Make matching requests misbehave (see `Fault`); `path` is a regex searched in the URL path."""
        if action not in FAULT_ACTIONS:
            raise ValueError(f"action={action!r}: choose one of {FAULT_ACTIONS}")
        fault = Fault(action, method.upper(), re.compile(path), times, seconds)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget every injected fault and let stalled requests go."""
        with self.state.lock:
            self.state.faults.clear()
        self.release_stalls()

    def release_stalls(self) -> None:
        """Let every request stalled so far go; faults injected later stall again."""
        with self.state.lock:
            released, self.state.release = self.state.release, threading.Event()
        released.set()

    def stop(self) -> None:
        self.state.release.set()  # stalled handler threads give up, so shutdown does not wait for them
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                 repo_type: str = "model") -> str:
        """A repo holding `files` (one commit on main), stored directly: no request is sent or recorded, so a test
        can seed a base model the code under test only reads. Returns the commit sha."""
        with self.state.lock:
            repo = Repo(repo_id, repo_type, private=private)
            commit = repo.add_commit(None, {".gitattributes": GITATTRIBUTES, **files}, "seeded")
            repo.refs["main"] = commit.oid
            self.state.repos[(repo_type, repo_id)] = repo
            return commit.oid

    # ---- inspection
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.state.repos.get((repo_type, repo_id))

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        return sorted(rid for (rtype, rid) in self.state.repos if rtype == repo_type)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repo(repo_id, repo_type)
        if repo is None:
            raise KeyError(f"no repo {repo_id!r} on the test server; it has {self.repo_ids(repo_type)}")
        return dict(repo.resolve(revision).files)

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        repo = self.repo(repo_id, repo_type)
        assert repo is not None, f"no repo {repo_id!r}"
        out, commit = [], repo.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out


def point_hub_client_at(server: HubServer, monkeypatch: Any, home: Any) -> None:
    """Point `huggingface_hub` (already imported, constants frozen) at `server`, with a private cache in `home`.

    huggingface_hub reads most settings once, at import: `constants.ENDPOINT` (HfApi default endpoint, hf_hub_url's
    base, RepoUrl), `constants.HUGGINGFACE_CO_URL_TEMPLATE` (hf_hub_download's file URL), `constants.HF_URL_HOSTS`
    (which redirect hosts keep the token), `constants.HF_HUB_OFFLINE` (tests/conftest.py sets HF_HUB_OFFLINE=1 before
    the import), the cache, token and other HF_HOME paths; `hf_api.api` is an HfApi built at import whose bound
    methods are the module-level functions (`create_repo`, `file_exists` that peft uses, ...); and the agent-harness
    registry (`utils._detect_agent._registry`) is cached in-process once fetched. Environment variables alone would
    reach none of these, so both are set; monkeypatch restores everything after the test.
    """
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    home = str(home)
    cache = f"{home}/hub"
    env = {"HF_ENDPOINT": server.url, "HF_HOME": home, "HF_HUB_CACHE": cache, "HF_TOKEN": server.token,
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    patched = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": f"{home}/assets",
        "HF_TOKEN_PATH": f"{home}/token",
        "HF_STORED_TOKENS_PATH": f"{home}/stored_tokens",
    }
    # Every other path derived from HF_HOME at import (update-check stamps, the agent-harness registry cache, the Xet
    # cache, ...) moves too, so nothing lands in the user's ~/.cache/huggingface.
    old_home = constants.HF_HOME.rstrip("/")
    for name, value in vars(constants).items():
        if name.isupper() and isinstance(value, str) and (value == old_home or value.startswith(old_home + "/")):
            patched.setdefault(name, home + value[len(old_home):])
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(hf_api.api, "_whoami_cache", {})
    monkeypatch.setattr(_detect_agent, "_registry", None)  # fetched from this server, forgotten afterwards
