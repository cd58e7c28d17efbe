"""A local stand-in for the Hugging Face Hub, for tests that must never touch the network.

``FakeHub({"org/name": {filename: bytes}})`` serves, on 127.0.0.1, the two things the real
``huggingface_hub`` client asks for: a model's file listing (``/api/models/<repo>``, with each file's
size) and its files (``/<repo>/resolve/<commit>/<file>``). ``listed_sizes`` overrides the sizes the
listing gives (a Hub that lies); ``requests`` records what was asked. ``Silent()`` accepts connections
and never answers: a Hub that hangs.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], listed_sizes: dict[str, int] | None = None):
        self.repos, self.listed_sizes = repos, dict(listed_sizes or {})
        self.sha = {n: hashlib.sha1(n.encode()).hexdigest() for n in repos}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _answer(self):
                hub.requests.append((self.command, self.path))
                path = self.path.split("?")[0]
                if path.startswith("/api/models/"):
                    name = "/".join(path[len("/api/models/"):].split("/")[:2])
                    if name not in hub.repos:
                        return self._send(404, b'{"error": "Repository not found"}',
                                          {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"})
                    siblings = [{"rfilename": f, "size": hub.listed_sizes.get(f, len(b))}
                                for f, b in hub.repos[name].items()]
                    body = json.dumps({"id": name, "modelId": name, "sha": hub.sha[name], "private": False,
                                       "siblings": siblings}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"})
                parts = path.lstrip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    name, filename = "/".join(parts[:2]), "/".join(parts[4:])
                    body = hub.repos.get(name, {}).get(filename)
                    if body is None:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                    return self._send(200, body, {"X-Repo-Commit": hub.sha[name],
                                                  "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                                                  "Content-Type": "application/octet-stream"})
                return self._send(404)

            do_GET = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def downloads(self) -> list[str]:
        """The files fetched (GET of a file; the listing and HEAD requests are not downloads)."""
        return [p.split("/resolve/", 1)[1].split("/", 1)[1] for c, p in self.requests if c == "GET" and "/resolve/" in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A socket on 127.0.0.1 that accepts every connection and never answers (a Hub that hangs)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._closed = True
        for c in self.accepted:
            c.close()
        self.sock.close()
