"""A small Hugging Face Hub stand-in on 127.0.0.1 for testing pushes with the real `huggingface_hub` client.

It implements only the routes a push uses: repository creation, branch creation, README metadata validation, the
`preupload` route (every file is answered `uploadMode: "regular"`, so no LFS or Xet traffic follows) and the NDJSON
commit route, whose file contents arrive base64-encoded. Every commit is recorded with the exact bytes received.
Routes can be made to fail with an HTTP status or to stall (so that the client times out).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO_ROUTE = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+|[^/]+)/(?P<action>\w+)/(?P<rev>.+)$"
)
ROUTES = ("create", "validate-yaml", "preupload", "commit", "branch")


@dataclass
class Commit:
    """One commit received by the loopback Hub."""

    repo_id: str
    revision: str
    summary: str
    description: str
    create_pr: bool
    files: dict[str, bytes]
    oid: str


@dataclass
class LoopbackHub:
    """A loopback Hub server; use it as a context manager and point `HF_ENDPOINT` at `endpoint`.

    Attributes:
        repos: repository id -> creation payload (`private`/`visibility`, `type`).
        branches: (repository id, branch) pairs created.
        commits: the commits received, in order.
        requests: `(route, path)` of every request to an implemented route, in order.
        authorizations: the `Authorization` header of every request to an implemented route.
        unhandled: `(method, path)` of the other requests (e.g. the client's best-effort telemetry), answered 404.
        fail: route name (see `ROUTES`) -> HTTP status to answer instead of doing the work.
        stall: route names that never answer (until the server closes), so that clients time out.
    """

    repos: dict[str, dict] = field(default_factory=dict)
    branches: list[tuple[str, str]] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    unhandled: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    stall: set[str] = field(default_factory=set)

    def __post_init__(self):
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repository at a branch, after every commit received so far."""
        files: dict[str, bytes] = {}
        for commit in self.commits:
            if commit.repo_id == repo_id and commit.revision == revision:
                files.update(commit.files)
        return files

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # Route handlers: each takes the parsed JSON body (or raw bytes for the commit) and returns (status, payload).

    def _create_repo(self, body: dict) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
        self.repos[repo_id] = body
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, body: dict) -> tuple[int, dict]:
        content = body["content"]
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": str(error)}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, repo_id: str, body: dict) -> tuple[int, dict]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False} for file in body["files"]]
        return 200, {"files": files, "commitOid": None}

    def _branch(self, repo_id: str, branch: str) -> tuple[int, dict]:
        if (repo_id, branch) in self.branches:
            return 409, {"error": "Reference already exists"}
        self.branches.append((repo_id, branch))
        return 200, {}

    def _commit(self, repo_id: str, revision: str, query: str, raw: bytes) -> tuple[int, dict]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        files = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"the loopback Hub only accepts inline base64 files, got {line['key']}"}
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        create_pr = "create_pr=1" in query
        oid = hashlib.sha1(raw).hexdigest()
        self.commits.append(
            Commit(repo_id, revision, header["summary"], header.get("description", ""), create_pr, files, oid)
        )
        number = len(self.commits)
        return 200, {
            "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": f"{self.endpoint}/{repo_id}/discussions/{number}" if create_pr else None,
        }

    def _dispatch(self, route: str, path: str, query: str, raw: bytes) -> tuple[int, dict]:
        if route == "create":
            return self._create_repo(json.loads(raw))
        if route == "validate-yaml":
            return self._validate_yaml(json.loads(raw))
        match = REPO_ROUTE.match(path)
        repo_id, revision = match["repo"], unquote(match["rev"])
        if route == "preupload":
            return self._preupload(repo_id, json.loads(raw))
        if route == "commit":
            return self._commit(repo_id, revision, query, raw)
        return self._branch(repo_id, revision)

    @staticmethod
    def _route(method: str, path: str) -> str | None:
        """The name of the route a request goes to (one of `ROUTES`), or `None` if the server lacks it."""
        if method != "POST":
            return None
        if path == "/api/repos/create":
            return "create"
        if path == "/api/validate-yaml":
            return "validate-yaml"
        match = REPO_ROUTE.match(path)
        if match and match["type"] == "models" and match["action"] in ROUTES:
            return match["action"]
        return None


def _handler_for(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def _respond(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _handle(self) -> None:
            url = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            route = hub._route(self.command, url.path)
            if route is None:
                hub.unhandled.append((self.command, url.path))
                self._respond(404, {"error": f"the loopback Hub does not implement {self.command} {url.path}"})
                return
            hub.requests.append((route, url.path))
            hub.authorizations.append(self.headers.get("Authorization"))
            if route in hub.stall:
                hub._closing.wait()
                return
            if route in hub.fail:
                self._respond(hub.fail[route], {"error": f"loopback Hub: {route} failed on purpose"})
                return
            status, payload = hub._dispatch(route, url.path, url.query, raw)
            self._respond(status, payload)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler
