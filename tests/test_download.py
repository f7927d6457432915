"""First-use downloads (jaxmem/data/download.py) against a local HTTP server: no network.

The served archives are the fake official-format files of test_data_real.py.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import test_data_real as fakes

import jaxmem.data
from jaxmem import cli
from jaxmem.data import cifar, download, locate, tiny_imagenet
from jaxmem.errors import UserError


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files[path] = (body, bytes actually sent)` with the full Content-Length,
    after `server.delay` seconds."""

    def do_GET(self):
        self.server.requests.append(self.path)
        time.sleep(self.server.delay)
        body, sent = self.server.files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])  # fewer bytes, then the connection closes: truncated
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the fallback cache folder
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.delenv(download.ENV_VAR, raising=False)  # conftest forbids downloads
    monkeypatch.setenv("no_proxy", "*")  # urllib must not send 127.0.0.1 to a proxy


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.delay = {}, [], 0.0
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def publish(server, monkeypatch, name: str, body: bytes, md5=None, sent=None) -> str:
    """Serve `body` as the official archive `name`; returns its URL."""
    server.files[f"/{name}"] = (body, len(body) if sent is None else sent)
    url = f"http://127.0.0.1:{server.server_port}/{name}"
    monkeypatch.setitem(download.ARCHIVES, name,
                        download.Archive(url, md5 or hashlib.md5(body).hexdigest()))
    return url


def cifar_archive(tmp_path, spec):
    files = fakes.fake_cifar(spec)
    return files, fakes.write_cifar_tarball(spec, files, tmp_path / "src").read_bytes()


@pytest.mark.parametrize("spec", [cifar.CIFAR10, cifar.CIFAR100], ids=lambda s: s.name)
def test_downloads_checks_and_loads_end_to_end(spec, tmp_path, server, monkeypatch):
    files, body = cifar_archive(tmp_path, spec)
    publish(server, monkeypatch, spec.archive, body)
    data = tmp_path / "fresh" / "data"  # a fresh node: not even the data dir exists
    fakes.check_cifar(jaxmem.data.load(spec.name, str(data)), spec, files)
    assert (data / spec.archive).read_bytes() == body
    assert not list(data.glob(".*part"))
    fakes.check_cifar(jaxmem.data.load(spec.name, str(data)), spec, files)  # not fetched again
    assert server.requests == [f"/{spec.archive}"]


def test_tiny_imagenet_zip_is_downloaded(tmp_path, server, monkeypatch):
    fake = fakes.fake_tiny_imagenet(tmp_path / "src")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((tmp_path / "src").rglob("*")):
            archive.write(path, path.relative_to(tmp_path / "src"))
    publish(server, monkeypatch, tiny_imagenet.ARCHIVE, buffer.getvalue())
    fakes.check_tiny(jaxmem.data.load("tiny_imagenet", str(tmp_path / "data")), fake)
    assert (tmp_path / "data" / tiny_imagenet.ARCHIVE).read_bytes() == buffer.getvalue()


def fails(data, match: str) -> str:
    """Loading CIFAR-10 from `data` raises a one-line UserError; nothing is left in `data`."""
    with pytest.raises(UserError, match=match) as error:
        jaxmem.data.load("cifar10", str(data))
    message = str(error.value)
    assert "\n" not in message and str(data) in message and "cifar-10-python.tar.gz" in message
    assert list(data.iterdir()) == []  # no archive, no temporary file
    return message


@pytest.mark.parametrize("fault", ["truncated", "checksum"])
def test_bad_download_leaves_nothing(fault, tmp_path, server, monkeypatch):
    _, body = cifar_archive(tmp_path, cifar.CIFAR10)
    md5, sent = ("0" * 32, None) if fault == "checksum" else (None, len(body) // 2)
    url = publish(server, monkeypatch, cifar.CIFAR10.archive, body, md5=md5, sent=sent)
    message = fails(tmp_path / "data", "has MD5" if md5 else f"stopped after {len(body) // 2:,}")
    assert url in message


def dead_url(monkeypatch) -> str:
    """Point CIFAR-10 at a closed local port (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    monkeypatch.setitem(download.ARCHIVES, cifar.CIFAR10.archive, download.Archive(url, "0" * 32))
    return url


def test_server_down_is_one_line_naming_file_url_and_data_dir(tmp_path, monkeypatch):
    url = dead_url(monkeypatch)
    message = fails(tmp_path / "data", "cannot download")
    assert url in message and "--no-download" in message and download.ENV_VAR in message


def test_opt_out_never_sends_a_request(tmp_path, server, monkeypatch):
    _, body = cifar_archive(tmp_path, cifar.CIFAR10)
    publish(server, monkeypatch, cifar.CIFAR10.archive, body)
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="no data found.*downloads are off"):
        jaxmem.data.load("cifar10", str(tmp_path / "data"), download=False)
    monkeypatch.setenv(download.ENV_VAR, "1")
    fails(tmp_path / "data", "no data found.*downloads are off")
    with pytest.raises(UserError, match="tiny-imagenet-200.zip.*downloads are off"):
        jaxmem.data.load("tiny_imagenet", str(tmp_path / "data"))
    assert server.requests == []


def test_no_download_flag_reaches_the_loader(tmp_path, monkeypatch, capsys):
    dead_url(monkeypatch)  # were the flag lost, this gives "cannot download" instead
    assert not hasattr(cli.build_parser().parse_args([]), "download")  # Config default: on
    (tmp_path / "data").mkdir()
    code = cli.main(["--dataset=cifar10", f"--data-dir={tmp_path / 'data'}", "--no-download",
                     f"--out={tmp_path / 'run'}"])
    assert code == 2 and "downloads are off" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_downloaded_files_have_the_permissions_of_any_new_file(umask, tmp_path, server,
                                                              monkeypatch):
    """The archive and the decoded cache beside it: a group sharing the data dir reads them."""
    _, body = cifar_archive(tmp_path, cifar.CIFAR10)
    publish(server, monkeypatch, cifar.CIFAR10.archive, body)
    before = os.umask(umask)
    try:
        jaxmem.data.load("cifar10", str(tmp_path / "data"))
    finally:
        os.umask(before)
    written = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert tmp_path / "data" / cifar.CIFAR10.archive in written and len(written) > 2
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {
        p.name: 0o666 & ~umask for p in written}


# Waits until both children are ready, then fetches CIFAR-10's archive from the mirror; the
# archive's checksum is the fake's (the official address, a closed port, is never used).
SHARED_DOWNLOAD = """
import os, sys, time
from pathlib import Path
from jaxmem.data import download
folder, md5, ready = sys.argv[1:]
name = "cifar-10-python.tar.gz"
download.ARCHIVES[name] = download.Archive("http://127.0.0.1:9/" + name, md5)
Path(ready, str(os.getpid())).touch()
while len(os.listdir(ready)) < 2:
    time.sleep(0.01)
print(download.fetch(name, Path(folder), "cifar10"))
"""


def mirror_env(server, path: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != download.ENV_VAR}
    return {**env, download.MIRROR_VAR: f"http://127.0.0.1:{server.server_port}{path}"}


def test_two_processes_on_one_data_dir_download_once(tmp_path, server):
    body = b"the archive" * 1000
    server.files[f"/{cifar.CIFAR10.archive}"] = (body, len(body))
    server.delay = 1.0  # the second process asks while the first is downloading
    data, ready = tmp_path / "data", tmp_path / "ready"
    ready.mkdir()
    children = [subprocess.Popen(
        [sys.executable, "-c", SHARED_DOWNLOAD, str(data), hashlib.md5(body).hexdigest(),
         str(ready)], env=mirror_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for _ in range(2)]
    done = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], done
    assert {out.strip() for out, _ in done} == {str(data / cifar.CIFAR10.archive)}
    assert server.requests == [f"/{cifar.CIFAR10.archive}"]  # one download for both
    assert sum("downloading" in err for _, err in done) == 1
    assert os.listdir(data) == [cifar.CIFAR10.archive]  # no lock or temporary file left
    assert (data / cifar.CIFAR10.archive).read_bytes() == body


def test_a_mirror_is_checked_against_the_published_checksum(tmp_path, server, monkeypatch):
    """The mirror serves a file that is not the official archive: refused, nothing kept."""
    server.files[f"/mirror/{cifar.CIFAR10.archive}"] = (b"not cifar", 9)
    monkeypatch.setenv(download.MIRROR_VAR, f"http://127.0.0.1:{server.server_port}/mirror/")
    message = fails(tmp_path / "data", "has MD5")
    url = f"http://127.0.0.1:{server.server_port}/mirror/{cifar.CIFAR10.archive}"
    published = download.ARCHIVES[cifar.CIFAR10.archive].md5
    assert url in message and f"not the published {published}" in message
    assert server.requests == [f"/mirror/{cifar.CIFAR10.archive}"]
