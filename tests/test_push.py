"""`uvd push RUN REPO_ID` against a local HTTP server that speaks the Hub endpoints huggingface_hub uses
(create repo, preupload, commit): the real client library runs end to end and nothing contacts a hub."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest

from uvd import manifest as M
from uvd.cli import main
from uvd.records import Reject
from uvd.shards import rejects_table, write_shard


class FakeHub(BaseHTTPRequestHandler):
    """Records every request; repos in `existing` answer 409 to create (as the Hub does)."""

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        self.server.requests.append(("GET", self.path, None, dict(self.headers)))
        self._reply(404, {"error": "not served by the fake hub"})

    def do_POST(self):
        body = self._body()
        self.server.requests.append(("POST", self.path, body, dict(self.headers)))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data.get('organization')}/{data['name']}"
            if repo in self.server.existing:
                return self._reply(409, {"error": "You already created this dataset repo", "url": f"{base}/datasets/{repo}"})
            self.server.existing.add(repo)
            return self._reply(200, {"url": f"{base}/datasets/{repo}"})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            repo = self.path.split("/api/datasets/")[1].split("/commit/")[0]
            return self._reply(200, {"commitUrl": f"{base}/datasets/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._reply(404, {"error": "not served by the fake hub"})

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests, server.existing = [], set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()


def _run(tmp_path, status="complete"):
    run = tmp_path / "laion"
    (run / "data").mkdir(parents=True)
    (run / "rejects").mkdir()
    rows = [{"id": f"s{i}", "source": "laion", "task": "single", "num_images": 1,
             "tokens": np.full(256, i, np.uint16), "images": [f"00000.tar/{i}"], "meta": "{}"} for i in range(2)]
    write_shard(rows, run / "data/laion-000000-000.parquet", 16, "zstd", 3)
    pq.write_table(rejects_table([Reject("00000.tar/7", "corrupt_image", "bad", "00000.tar")]),
                   run / "rejects/laion-000000.parquet")
    (run / M.RECIPE_FILE).write_text("source: laion\n")
    M.write_manifest(run, {"schema_version": 2, "source": "laion", "recipe_hash": "0", "status": status,
                           "tokenizer": {"id": "t", "trained": False},
                           "rejects": {"files": ["rejects/laion-000000.parquet"], "count": 1, "by_reason": {"corrupt_image": 1}},
                           "shards": {"data/laion-000000-000.parquet": {"sentences": 2, "images": 2, "tokens": 512}}})
    for work in (run / "_uvd" / "work", run / "_uvd" / "writes"):  # bookkeeping: never uploaded
        work.mkdir(parents=True)
        (work / "000000.parquet").write_bytes(b"cache")
    (run / "_uvd" / "lock").write_text("pid 1")
    (run / "data" / ".laion-000000-001.parquet.tmp").write_bytes(b"half written")
    return run


def _commit_files(hub) -> tuple[dict, dict[str, bytes]]:
    (_, _, body, _), = [r for r in hub.requests if "/commit/" in r[1]]
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
    return header, files


def test_push_uploads_the_run_folder(hub, tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["push", str(run), "me/uvd-laion"]) == 0
    assert "/datasets/me/uvd-laion/commit/" in capsys.readouterr().out
    create = json.loads(next(r[2] for r in hub.requests if r[1] == "/api/repos/create"))
    assert create == {"name": "uvd-laion", "organization": "me", "type": "dataset"}
    # every call the push makes carries the token (the library's own GET probes, e.g. /api/agent-harnesses
    # once per process, are not the push's)
    posts = [r for r in hub.requests if r[0] == "POST"]
    assert len(posts) >= 3 and all(
        r[3].get("authorization") == "Bearer hf_fake_token" or r[3].get("Authorization") == "Bearer hf_fake_token" for r in posts)
    header, files = _commit_files(hub)
    expected = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*")
                if p.is_file() and not p.relative_to(run).as_posix().startswith("_uvd/")
                and not p.name.endswith(".tmp")}
    assert set(expected) == {"data/laion-000000-000.parquet", "rejects/laion-000000.parquet", M.RECIPE_FILE, M.MANIFEST}
    assert files == expected  # byte for byte, and nothing of _uvd/ or temp files
    assert "2 sentences" in header["summary"]

    hub.requests.clear()  # a second push to the existing repo: create answers 409 and the upload goes on
    assert main(["push", str(run), "me/uvd-laion", "--message", "again"]) == 0
    assert _commit_files(hub)[0]["summary"] == "again"


def test_push_refuses_runs_that_are_not_complete(hub, tmp_path, capsys):
    run = _run(tmp_path, status="running")
    assert main(["push", str(run), "me/x"]) == 2
    assert "status is 'running', not 'complete'" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nothing"), "me/x"]) == 2
    (tmp_path / "plain").mkdir()
    assert main(["push", str(tmp_path / "plain"), "me/x"]) == 2
    assert "not a UVD run folder" in capsys.readouterr().err
    assert hub.requests == []  # refused before any request
