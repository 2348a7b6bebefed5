"""A local stand-in for ModelScope and the Hugging Face Hub: the requests their SDKs make when downloading.

Serves plain http:// on 127.0.0.1, logs every request, and answers 404 to anything it does not serve. Point the
SDKs at it with their own settings: MODELSCOPE_ENDPOINT (or the older MODELSCOPE_DOMAIN) and HF_ENDPOINT.

Endpoints (found by pointing modelscope 1.40 and huggingface_hub 2.4 at it and reading their sources):
  ModelScope  GET /api/v1/datasets/{org}/{name}/repo/tree?Revision=&Recursive=&PageNumber=&PageSize=
              GET /api/v1/models/{org}/{name}/repo/files?Revision=&Recursive=
              GET /api/v1/{datasets|models}/{org}/{name}/repo?Revision=&FilePath=     (the file)
  Hub         GET /api/models/{org}/{name}/revision/{revision}                          (the commit sha)
              GET /api/models/{org}/{name}/tree/{sha}?recursive=true
              HEAD|GET /{org}/{name}/resolve/{sha}/{path}                               (the file)
"""
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


def commit_sha(files: dict[str, bytes]) -> str:
    """A 40-hex commit id that changes with the content, as a git commit would."""
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
    return digest.hexdigest()


class Repo:
    """One repository: its branches/tags, each a commit of {path: bytes}."""

    def __init__(self, files: dict[str, bytes], default: str):
        self.default = default
        self.commits = {}
        self.refs = {}
        self.add_revision(default, files)

    def add_revision(self, name: str, files: dict[str, bytes]) -> str:
        sha = commit_sha(files)
        self.commits[sha] = files
        self.refs[name] = sha
        return sha

    def resolve(self, revision: str | None) -> str | None:
        revision = revision or self.default
        return revision if revision in self.commits else self.refs.get(revision)


class HubStandIn:
    """Both hubs on one port. `modelscope` and `hub` map (kind, "org/name") to a Repo.

    failing: {path prefix: "503" or "hang"}: requests under it are answered 503, or read and never answered.
    stall_file: a file path whose download stops after half its bytes, sets `stalled` and waits for `release`.
    """

    def __init__(self):
        self.modelscope: dict[tuple[str, str], Repo] = {}
        self.hub: dict[tuple[str, str], Repo] = {}
        self.log: list[dict] = []
        self.failing: dict[str, str] = {}  # path prefix -> "503" (answered 503) or "hang" (read, never answered)
        self.stall_file: str | None = None
        self.stalled, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._server = None

    # ---- lifecycle
    def start(self) -> "HubStandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                standin._handle(self)

            do_HEAD = do_POST = do_GET

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that hung up: the log says what matters
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"  # kept after stop(): a port nothing listens on
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def env(self) -> dict[str, str]:
        return {"MODELSCOPE_ENDPOINT": self.url, "HF_ENDPOINT": self.url, "NO_PROXY": "127.0.0.1",
                "no_proxy": "127.0.0.1"}

    def requests(self, prefix: str = "") -> list[dict]:
        with self._lock:
            return [r for r in self.log if r["path"].startswith(prefix)]

    # ---- request handling
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        entry = {"method": h.command, "path": unquote(url.path), "query": query, "range": h.headers.get("Range"),
                 "at": time.monotonic(), "status": None, "closed_at": None}
        with self._lock:
            self.log.append(entry)
        failure = next((how for prefix, how in self.failing.items() if entry["path"].startswith(prefix)), None)
        if failure == "hang":  # read, never answer: the client's read timeout ends it
            h.close_connection = True
            h.connection.settimeout(120)
            try:
                h.rfile.read(1)  # blocks until the client gives up and closes
            except OSError:
                pass
            entry["closed_at"] = time.monotonic()
            return
        if failure == "503":
            return self._reply(h, entry, 503, b'{"error": "service unavailable"}')
        try:
            status, body, headers = self._route(entry)
        except KeyError:
            status, body, headers = 404, b'{"Code": 404, "Message": "not found", "error": "not found"}', {}
        self._reply(h, entry, status, body, headers)

    def _reply(self, h, entry, status, body, headers=None):
        entry["status"] = status
        headers = {"Content-Type": "application/json", **(headers or {})}
        served = entry["query"].get("FilePath") or entry["path"].partition("/resolve/")[2].partition("/")[2]
        stall = h.command == "GET" and status == 200 and served == self.stall_file
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if stall:  # half the bytes, then nothing: the test interrupts the download here
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            entry["stalled"] = True
            self.stalled.set()
            self.release.wait(60)
            h.close_connection = True
            return
        h.wfile.write(body)

    def _route(self, e) -> tuple[int, bytes, dict]:
        parts = e["path"].strip("/").split("/")
        if parts[:2] == ["api", "v1"] and len(parts) >= 6:  # ModelScope
            kind, repo_id, action = parts[2].rstrip("s"), "/".join(parts[3:5]), "/".join(parts[5:])
            repo = self.modelscope[(kind, repo_id)]
            sha = repo.resolve(e["query"].get("Revision"))
            files = repo.commits[sha]
            if action in ("repo/tree", "repo/files"):
                page = int(e["query"].get("PageNumber", 1))
                listing = [{"Name": Path(p).name, "Path": p, "Type": "blob", "Size": len(b),
                            "Sha256": hashlib.sha256(b).hexdigest(), "Revision": sha} for p, b in sorted(files.items())]
                listing = listing if page == 1 else []
                return 200, json.dumps({"Code": 200, "Success": True, "Data": {"Files": listing}}).encode(), {}
            if action == "repo":
                return 200, files[e["query"]["FilePath"]], {"Content-Type": "application/octet-stream"}
            raise KeyError(action)
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("models", "datasets"):  # Hub API
            kind, repo_id, action = parts[1].rstrip("s"), "/".join(parts[2:4]), parts[4]
            repo = self.hub[(kind, repo_id)]
            sha = repo.resolve("/".join(parts[5:]))
            files = repo.commits[sha]
            if action == "revision":
                siblings = [{"rfilename": p} for p in sorted(files)]
                return 200, json.dumps({"id": repo_id, "sha": sha, "siblings": siblings, "private": False}).encode(), {}
            if action == "tree":
                tree = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for p, b in sorted(files.items())]
                return 200, json.dumps(tree).encode(), {}
            raise KeyError(action)
        if len(parts) >= 5 and parts[2] == "resolve":  # Hub file: /{org}/{name}/resolve/{rev}/{path}
            repo = self.hub[("model", "/".join(parts[:2]))]
            sha = repo.resolve(parts[3])
            body = repo.commits[sha]["/".join(parts[4:])]
            return 200, body, {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                               "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
        raise KeyError(e["path"])
