"""Artefacts by name, hf:// and https://: fetched from a local HTTP server started here (no test
touches the internet): download, reuse, resume of a partial file, hash mismatch, 404, offline."""

import hashlib
import http.server
import os
import threading

import pytest

from sra import artefacts as A
from sra.errors import SraError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Server:
    """A tiny file server: plain paths, HTTP Range, an optional connection drop mid-file, and
    the few Hugging Face Hub routes huggingface_hub's file download uses."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}  # path → bytes sent before the connection drops (once)
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body: bool):
                path = self.path.split("?")[0]
                server.requests.append((self.command, path, self.headers.get("Range")))
                data = server.files.get(path)
                if data is None:
                    self.send_response(404)
                    if "/resolve/" in path:  # as the Hub answers a missing file
                        self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                chunk = data[start:]
                cut = server.drop_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(chunk[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the network goes away mid-file
                    return
                self.wfile.write(chunk)

            def do_GET(self):
                self._serve(True)

            def do_HEAD(self):
                self._serve(False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(monkeypatch, tmp_path):
    s = _Server()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    for var in A.OFFLINE_ENVS:
        monkeypatch.delenv(var, raising=False)
    yield s
    s.close()


def test_plain_url_downloads_once_and_is_reused(server):
    data = os.urandom(300_000)
    server.files["/refs/batch.npz"] = data
    path = A.resolve(f"{server.url}/refs/batch.npz")
    assert path.read_bytes() == data and path.parent == A.download_dir()
    n = len(server.requests)
    assert A.resolve(f"{server.url}/refs/batch.npz") == path
    assert len(server.requests) == n  # served from the cache


def test_partial_download_is_resumed_with_a_range_request(server):
    data = os.urandom(3 * A.CHUNK + 123)
    server.files["/big.pt"] = data
    server.drop_after["/big.pt"] = A.CHUNK + 7
    url = f"{server.url}/big.pt"
    with pytest.raises(SraError, match="partial file is kept"):
        A.resolve(url)
    part = A.cache_path(url).with_name(A.cache_path(url).name + ".part")
    assert 0 < part.stat().st_size < len(data)
    path = A.resolve(url)
    assert path.read_bytes() == data and not part.exists()
    assert server.requests[-1][2] == f"bytes={A.CHUNK + 7}-"  # only the rest was fetched


def test_registry_hash_mismatch_and_404_are_one_line(server, monkeypatch):
    data = b"not the real weights" * 100
    server.files["/w.pth"] = data
    good = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(A.ARTEFACTS, "test-weights",
                        A.Artefact("test-weights", f"{server.url}/w.pth", "inception", "x", sha256="ab" * 32))
    with pytest.raises(SraError, match="does not match the registry") as err:
        A.resolve("test-weights")
    assert len(str(err.value).splitlines()) == 1
    assert not A.cache_path(f"{server.url}/w.pth").exists()
    monkeypatch.setitem(A.ARTEFACTS, "test-weights",
                        A.Artefact("test-weights", f"{server.url}/w.pth", "inception", "x",
                                   size=len(data), sha256=good[:8]))
    assert A.resolve("test-weights").read_bytes() == data
    with pytest.raises(SraError, match="HTTP 404"):
        A.resolve(f"{server.url}/missing.npz")


def test_offline_uses_the_cache_or_says_so(server, monkeypatch):
    server.files["/a.npz"] = b"abc"
    path = A.resolve(f"{server.url}/a.npz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(server.requests)
    assert A.resolve(f"{server.url}/a.npz") == path and len(server.requests) == n
    with pytest.raises(SraError, match="downloads are off"):
        A.resolve(f"{server.url}/b.npz")


def test_hf_addresses_go_through_huggingface_hub_and_its_cache(server, monkeypatch, tmp_path):
    data = os.urandom(5000)
    server.files["/owner/repo/resolve/main/sub/model.safetensors"] = data
    path = A.resolve("hf://owner/repo/sub/model.safetensors")
    assert path.read_bytes() == data
    assert str(path).startswith(str(tmp_path / "hf-home" / "hub"))  # HF_HOME is honoured
    # a huggingface.co resolve URL is the same file, through the same cache
    server.files["/owner/repo/resolve/v1/x.bin"] = b"xyz"
    assert A.resolve("https://huggingface.co/owner/repo/resolve/v1/x.bin").read_bytes() == b"xyz"
    # offline with a warm cache works; without a cached copy it is one line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert A.resolve("hf://owner/repo/sub/model.safetensors").read_bytes() == data
    with pytest.raises(SraError, match="not in the Hugging Face cache"):
        A.resolve("hf://owner/repo/other.pt")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(SraError, match="not found on the Hub|download failed"):
        A.resolve("hf://owner/repo/missing.pt")


def test_every_registry_entry_resolves_from_the_local_server(server, monkeypatch):
    # Each entry's address is redirected to the local server, which holds a file for it.
    for name, art in list(A.ARTEFACTS.items()):
        data = f"content of {name}".encode()
        if art.url.startswith("hf://"):
            repo, _, path = A.parse_hf(art.url)
            server.files[f"/{repo}/resolve/main/{path}"] = data
            url = art.url
        else:
            server.files[f"/{name}"] = data
            url = f"{server.url}/{name}"
        sha = hashlib.sha256(data).hexdigest()
        monkeypatch.setitem(A.ARTEFACTS, name, A.Artefact(name, url, art.kind, art.about,
                                                          size=len(data), sha256=sha))
        assert A.resolve(name).read_bytes() == data
        assert A.resolve(name).read_bytes() == data  # and again, from the cache


def test_local_paths_and_unknown_names(tmp_path):
    f = tmp_path / "x.npz"
    f.write_bytes(b"1")
    assert A.resolve(str(f)) == f
    with pytest.raises(FileNotFoundError, match="a known name"):
        A.resolve(str(tmp_path / "nope.npz"), what="--ref")
    with pytest.raises(SraError, match="bad hf:// address"):
        A.parse_hf("hf://onlyowner")


def test_cli_takes_hf_addresses_and_urls_wherever_a_file_goes(server, tmp_path, capsys):
    """`sra sample --ckpt hf://…` and `sra eval --ref URL` fetch, then work as with local files."""
    import io

    import numpy as np
    from safetensors.torch import save

    from sra.cli import main
    from sra.models import build_model, model_config

    model = build_model(model_config("SiT-S/4", depth=1, hidden_size=32, num_heads=2, input_size=8,
                                     in_channels=3, num_classes=2, use_head=False))
    server.files["/me/tiny/resolve/main/m.safetensors"] = save(
        {k: v.contiguous() for k, v in model.state_dict().items()})
    out = tmp_path / "samples"
    code = main(["sample", "--ckpt", "hf://me/tiny/m.safetensors", "--data-kind", "pixels",
                 "--mode", "euler", "--num-steps", "2", "--num-samples", "2", "--per-proc-batch-size", "2",
                 "--output-dir", str(out), "--grid-size", "0", "--cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    # --ref by URL: fetched before it is read; a bad one is named in one line
    buf = io.BytesIO()
    np.savez(buf, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    server.files["/ref.npz"] = buf.getvalue()
    code = main(["eval", str(out / "samples.npz"), "--ref", f"{server.url}/ref.npz",
                 "--inception-weights", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "ref.npz" in err and "uint8" in err, err

