"""A local stand-in for the Hugging Face Hub: the endpoints an upload uses (repo creation, preupload,
commit), on 127.0.0.1, with injectable failures. Files arrive as the real client sends them."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.fail: dict[str, list[int]] = {}  # endpoint kind -> statuses to answer next, in order
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.cards: list[dict] = []  # the front matter of every README the client validated
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"not served: {self.path}"})

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path))
                hub.auth_headers.append(self.headers.get("Authorization", ""))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = self.path.split("?")[0].strip("/").split("/")
                kind = "create" if parts[:3] == ["api", "repos", "create"] else parts[4] if len(parts) > 4 else "?"
                if hub.fail.get(kind):
                    return self._reply(hub.fail[kind].pop(0), {"error": "injected failure"})
                if parts[:2] == ["api", "validate-yaml"]:  # the client checks a README's front matter
                    import yaml

                    content = json.loads(body)["content"]
                    front = content.split("---")[1] if content.startswith("---") else ""
                    hub.cards.append(yaml.safe_load(front) or {})
                    return self._reply(200, {"errors": [], "warnings": []})
                if kind == "create":
                    info = json.loads(body)
                    repo = f"{info['organization']}/{info['name']}" if info.get("organization") else info["name"]
                    private = bool(info.get("private")) or info.get("visibility") == "private"  # old and new clients
                    hub.repos.setdefault(repo, {"private": private, "files": {}, "commits": []})
                    return self._reply(200, {"url": f"http://127.0.0.1/{repo}", "name": repo})
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False, "oid": None} for f in files]})
                if kind == "commit":
                    header, added = None, {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            header = item["value"]
                        elif item["key"] == "file":
                            value = item["value"]
                            assert value["encoding"] == "base64"
                            added[value["path"]] = base64.b64decode(value["content"])
                    hub.repos[repo]["files"].update(added)
                    hub.repos[repo]["commits"].append(header)
                    oid = f"{len(hub.repos[repo]['commits']):040x}"
                    return self._reply(200, {"commitUrl": f"http://127.0.0.1/{repo}/commit/{oid}", "commitOid": oid})
                self._reply(404, {"error": f"not served: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
