"""A loopback HTTP server answering GETs from a table of routes: the stand-in for the hub and the weight hosts in
the bake tests (scripts/bake_weights.py) and the build-steps test; and a server that trickles (deadlines, cancels)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import typing as tp
import urllib.parse


class Server:
    """Loopback HTTP: each path answers from its list of (status, headers, body), the last one repeating."""

    def __init__(self, routes: dict[str, list[tuple[int, dict[str, str], bytes]]], on_request=None):
        self.routes = routes
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = urllib.parse.urlparse(self.path).path
                n = outer.hits.get(path, 0)
                outer.hits[path] = n + 1
                if on_request:
                    on_request(path)
                answers = outer.routes.get(path, [(404, {}, b"not found")])
                status, headers, body = answers[min(n, len(answers) - 1)]
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def git_blob_sha1(data: bytes) -> str:
    """The hub's `blobId` of a small (non-LFS) file: git's object id."""
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # noqa: S324 - git's object id


def hub_routes(repo: str, commit: str, files: dict[str, bytes], lfs: tp.Collection[str] = ()) -> dict:
    """Routes answering as the Hugging Face hub does for model `repo` at `commit` (also as `main`): its metadata
    with checksums (`model_info(files_metadata=True)`), and each file under `resolve/<commit>/`. Files named in
    `lfs` are described as LFS files (sha256), the others by their git blob id."""
    siblings = []
    for name, data in files.items():
        sibling: dict[str, tp.Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if name in lfs:
            sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        siblings.append(sibling)
    info = [
        (
            200,
            {"Content-Type": "application/json"},
            json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode(),
        )
    ]
    routes = {f"/api/models/{repo}": info, f"/api/models/{repo}/revision/main": info}
    routes.update({f"/{repo}/resolve/{commit}/{name}": [(200, {}, data)] for name, data in files.items()})
    return routes


class Trickle:
    """A loopback HTTP server that sends `data`'s first KB, then one byte every `delay` seconds: a download that
    would take hours (for deadlines and cancels). `started` is set once the first KB is out."""

    def __init__(self, data: bytes, delay: float = 0.05):
        self.started = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data[:1024])
                    outer.started.set()
                    for i in range(1024, len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(delay)
                except OSError:  # the client went away (a deadline, a cancel)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/trained_model.tar"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
