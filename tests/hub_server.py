"""A small Hugging Face Hub stand-in for tests: a threaded HTTP server on 127.0.0.1.

It answers what huggingface_hub 2.4's ``HfApi.create_repo`` / ``upload_folder`` / ``create_commit``,
``ModelCard.load`` / ``hf_hub_download`` and transformers' ``push_to_hub`` / ``from_pretrained(repo_id)``
send (found by reading hf_api.py, _commit_api.py, _upload_pipeline.py and file_download.py):

    POST /api/repos/create                          create a repo (409 when it exists)
    POST /api/validate-yaml                         README front matter must be a YAML mapping
    POST /api/models/{repo}/preupload/{rev}         uploadMode "regular" for every file (+ the
                                                    stored file's git oid, as the Hub does)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), deletedFile,
                                                    deletedFolder; applied atomically
    GET  /api/whoami-v2                             the caller, from the bearer token
    GET  /api/agent-harnesses                       an empty registry (huggingface_hub's user-agent
                                                    header asks for it once a day)
    GET  /api/models/{repo}[/revision/{rev}]        repo info with siblings
    HEAD/GET /{repo}/resolve/{rev}/{path}           file download (EntryNotFound / RepoNotFound)

Files live in memory: ``server.repos[repo_id].files[path] -> bytes``. Every request is logged in
``server.requests`` (method, path, Authorization header). ``server.fail_commits = N`` makes the next N
commit requests fail with HTTP 500 (and ``Retry-After: 0``, so huggingface_hub's automatic retries of
500s, which it does for commits of ``upload_folder``, come back at once instead of after 1+2+4+8+8 s).
``server.tokens``: when not empty, only these bearer tokens may write (401 otherwise).

Run it by hand with ``python tests/hub_server.py`` and point clients at the printed URL
(``HF_ENDPOINT=...`` or ``HfApi(endpoint=...)``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a regular file (what the Hub returns as its oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"oid", "summary", "paths"}

    @property
    def head(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class HubServer:
    """Start with ``HubServer().start()`` (or as a context manager); ``.url`` is the endpoint."""

    def __init__(self, user: str = "tester"):
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.fail_commits = 0
        self.tokens: set[str] = set()
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def files(self, repo_id: str) -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[repo_id].files)

    def write_repo(self, repo_id: str, dest: str | Path) -> Path:
        """Write a repo's files into ``dest`` (as a download of the whole repo would)."""
        dest = Path(dest)
        for path, data in self.files(repo_id).items():
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return dest

    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()
            self.unhandled.clear()

    def commit_requests(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "POST" and "/commit/" in r.path]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer sets Content-Length

    def log_message(self, format, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._send(status, {"error": message}, headers=extra)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _may_write(self) -> bool:
        token = self._token()
        if not token or (self.hub.tokens and token not in self.hub.tokens):
            self._error(401, "Invalid credentials in Authorization header", code="InvalidCredentials")
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", code="RepoNotFound")
        return repo

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append(Request(self.command, path, self.headers.get("Authorization")))
        body = self._body() if self.command in ("POST", "PUT") else b""
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/api/whoami-v2", self._whoami),
            ("GET", r"/api/agent-harnesses", self._agent_harnesses),
            ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self._model_info),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                handler(body=body, **{k: v for k, v in match.groupdict().items()})
                return
        with self.hub.lock:
            self.hub.unhandled.append(f"{self.command} {path}")
        self._error(404, f"no route for {self.command} {path} in the test hub")

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ routes

    def _create_repo(self, body: bytes) -> None:
        if not self._may_write():
            return
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization") or self.hub.user
        if (payload.get("type") or "model") != "model":
            self._error(400, "the test hub only hosts model repos")
            return
        repo_id = f"{org}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                # the Hub's 409 body carries the url too: create_repo(exist_ok=True) reads it
                self._send(409, {"error": "You already created this model repo", "url": url},
                           headers={"X-Error-Message": "You already created this model repo"})
                return
            self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        match = _YAML_BLOCK.search(content)
        if not match:
            self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
            return
        try:
            data = yaml.safe_load(match.group(2))
        except yaml.YAMLError as e:
            self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            return
        errors = []
        if not isinstance(data, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
        else:
            for key in ("tags", "datasets"):
                value = data.get(key)
                if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    errors.append({"message": f'"{key}" must be a list of strings'})
            if "model-index" in data and not isinstance(data["model-index"], list):
                errors.append({"message": '"model-index" must be a list'})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        if not self._may_write():
            return
        with self.hub.lock:
            stored = self._repo(repo)
            if stored is None:
                return
            files = []
            for f in json.loads(body or b"{}").get("files", []):
                old = stored.files.get(f["path"])
                files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                              "oid": git_blob_oid(old) if old is not None else None})
        self._send(200, {"files": files, "commitOid": stored.head})

    def _commit(self, body: bytes, repo: str, rev: str) -> None:
        if not self._may_write():
            return
        with self.hub.lock:
            if self.hub.fail_commits > 0:
                self.hub.fail_commits -= 1
                fail = True
            else:
                fail = False
        if fail:
            self._error(500, "Internal Error (injected by the test hub)", headers={"Retry-After": "0"})
            return
        with self.hub.lock:
            stored = self._repo(repo)
            if stored is None:
                return
            files = dict(stored.files)
            summary, paths = "", []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent and parent != stored.head:
                        self._error(412, "parent commit is not the head of the branch")
                        return
                elif key == "file":
                    if value.get("encoding") != "base64":
                        self._error(400, "only base64 file bodies are supported")
                        return
                    files[value["path"]] = base64.b64decode(value["content"])
                    paths.append(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:  # lfsFile: never asked for, since preupload answers "regular"
                    self._error(400, f"the test hub does not support {key!r} operations")
                    return
            oid = hashlib.sha1(f"{repo}:{len(stored.commits)}:{time.time_ns()}".encode()).hexdigest()
            stored.files = files
            stored.commits.append({"oid": oid, "summary": summary, "paths": paths})
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None, "success": True})

    def _whoami(self, body: bytes) -> None:
        if not self._may_write():
            return
        self._send(200, {"type": "user", "name": self.hub.user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _agent_harnesses(self, body: bytes) -> None:
        # huggingface_hub fetches this registry from {HF_ENDPOINT} once a day for its user-agent header
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def _model_info(self, body: bytes, repo: str, rev: str | None = None) -> None:
        with self.hub.lock:
            stored = self._repo(repo)
            if stored is None:
                return
            info = {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": stored.head,
                    "private": stored.private, "disabled": False, "gated": False, "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(stored.files)]}
        self._send(200, info)

    def _resolve(self, body: bytes, repo: str, rev: str, file: str) -> None:
        with self.hub.lock:
            stored = self._repo(repo)
            if stored is None:
                return
            if rev not in ("main", stored.head):
                self._error(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
                return
            data = stored.files.get(file)
            head = stored.head
        if data is None:
            self._error(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": head})
            return
        self._send(200, data, content_type="application/octet-stream",
                   headers={"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": head})


if __name__ == "__main__":
    with HubServer() as hub:
        print(f"test hub listening on {hub.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
