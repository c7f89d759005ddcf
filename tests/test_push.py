"""export.push against a stand-in Hub on 127.0.0.1 (the real Hub is never contacted).

The stand-in implements the endpoints huggingface_hub's create_repo + upload_folder call when
hf_xet is off (HF_HUB_DISABLE_XET=1): POST /api/repos/create, /api/validate-yaml (README
metadata), /api/models/<repo>/preupload/<rev> (it answers "regular" for every file, so contents
travel base64-encoded inside the ndjson commit) and /api/models/<repo>/commit/<rev>.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from test_evaluate import clone_run, tiny_run  # noqa: F401 (fixture)
from test_export import exported  # noqa: F401 (fixture)

TOKEN = "hf_standin-SECRET-0123456789-abcdefXYZ"  # not a real token; a unique string to look for
PROJECT = Path(__file__).resolve().parents[1]


class StandInHub:
    """A few Hub endpoints in a thread; records repos, commits, files and every request."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str]] = []   # (method, path, authorization)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization", "")))
                self._reply(404, {"error": "not implemented by the stand-in"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, self.headers.get("Authorization", "")))
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}"
                    hub.repos[repo] = req
                    hub.files.setdefault(repo, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # ['', 'api', 'models', org, name, op, rev]
                if len(parts) == 7 and parts[2] == "models" and f"{parts[3]}/{parts[4]}" in hub.repos:
                    repo, op = f"{parts[3]}/{parts[4]}", parts[5]
                    if op == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files]})
                    if op == "commit":
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                v = item["value"]
                                hub.files[repo][v["path"]] = base64.b64decode(v["content"])
                            elif item["key"] != "header":
                                return self._reply(400, {"error": f"unexpected {item['key']}"})
                        return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}",
                                                 "commitOid": "0" * 40, "pullRequestUrl": None})
                self._reply(404, {"error": "not implemented by the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # loopback only, free port
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def stage_env(tmp_path: Path, hub_url: str, token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                               "all_proxy")}
    env.update({
        "PYTHONPATH": str(PROJECT),
        "HF_ENDPOINT": hub_url,                     # every Hub call goes to the stand-in
        "HF_HOME": str(tmp_path / "hf-home"),       # no saved login of the machine's user
        "HF_HUB_DISABLE_XET": "1",                  # plain HTTP uploads, no xet protocol
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    })
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_export(root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.export_hf", "--params", str(root / "params.yaml"),
                           "--models", str(root / "models"), "--metrics", str(root / "metrics")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=180)


def set_export(root: Path, **values) -> None:
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["export"] = {"repo_id": "speedrunner/gpt2-tiny", "push": True, "private": True, **values}
    (root / "params.yaml").write_text(yaml.safe_dump(data))


def test_push_uploads_the_exact_folder(exported, tmp_path):
    root = clone_run(exported, tmp_path / "run")
    set_export(root)
    with StandInHub() as hub:
        proc = run_export(root, stage_env(tmp_path, hub.url, TOKEN))
    assert proc.returncode == 0, proc.stderr
    assert hub.repos["speedrunner/gpt2-tiny"]["visibility"] == "private"
    local = {p.relative_to(root / "models/hf").as_posix(): p.read_bytes()
             for p in (root / "models/hf").rglob("*") if p.is_file()}
    assert hub.files["speedrunner/gpt2-tiny"] == local  # byte-identical, nothing more or less
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)  # the token was used...
    # ...and written nowhere: not in the output, the folder, the metrics or the params
    assert TOKEN not in proc.stdout + proc.stderr
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert "pushed to speedrunner/gpt2-tiny" in proc.stdout
    assert not [r for r in hub.requests if r[1].startswith("/api/models") and "/commit/" not in r[1]
                and "/preupload/" not in r[1]]  # no unexpected calls


def test_push_without_token_fails_in_one_line_and_keeps_the_export(exported, tmp_path):
    root = clone_run(exported, tmp_path / "run")
    set_export(root)
    with StandInHub() as hub:
        proc = run_export(root, stage_env(tmp_path, hub.url, None))
    assert proc.returncode == 2
    assert "no Hugging Face token" in proc.stderr.strip().splitlines()[-1]
    assert (root / "models/hf/model.safetensors").is_file()  # DVC deletes it before the stage: written again
    assert hub.requests == []


def test_push_error_from_hub_is_one_line_without_token(exported, tmp_path):
    root = clone_run(exported, tmp_path / "run")
    set_export(root)
    with StandInHub() as hub:
        hub.server.RequestHandlerClass.do_POST = lambda self: self._reply(403, {"error": "forbidden"})
        proc = run_export(root, stage_env(tmp_path, hub.url, TOKEN))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "push of" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr

