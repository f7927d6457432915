"""Download an official dataset archive into the data dir the first time it is needed.

Standard library only (`urllib.request` + `hashlib`), no new dependency: all this needs is one
GET per archive, streamed to disk in chunks, with a progress bar (tqdm, already a dependency;
shown on a terminal only) and an MD5 check against the published checksum.

The archive is written to a temporary name (`.<file>-XXXX.part`) in the data dir and renamed
into place only after the whole file arrived and its checksum matched, so an interrupted, short
or corrupt download never leaves a file that looks complete (the temporary file is removed on
any failure). The loaders then read the archive as if it had been placed there by hand.

Jobs sharing a data dir (a job array on `$JAXMEM_DATA`) download once: a download holds an
exclusive `fcntl.flock` on `<file>.lock` in the data dir, so the others wait and then use the
file the first one verified and renamed into place. The lock file is removed by its holder
(which is why a waiter checks it still locks the file it opened). The archive gets the
permissions the umask gives any new file, so a group sharing the data dir can read it.

Air-gapped clusters with an internal HTTP mirror: `JAXMEM_DOWNLOAD_MIRROR=URL` fetches
`URL/<file name>` instead of the official address, checked against the same published MD5
(sets whose files share names keep them in a folder: `URL/mnist/<file name>`,
`URL/fashion_mnist/<file name>`, as in the data dir).
Opt out entirely: `--no-download` (Config field `download`) or `JAXMEM_NO_DOWNLOAD=1`; then a
missing file is the usual one-line "place it here" error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from jaxmem.atomic import umask_mode
from jaxmem.errors import UserError
from jaxmem.lockfile import lock_file

ENV_VAR = "JAXMEM_NO_DOWNLOAD"
MIRROR_VAR = "JAXMEM_DOWNLOAD_MIRROR"
OPT_OUT = f"--no-download or {ENV_VAR}=1"
CHUNK = 1 << 20
TIMEOUT_S = 60  # per blocking socket operation, not for the whole download


@dataclasses.dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    mirror_path: str = ""  # its path under a mirror (default: the file name)


# file name -> where it is published and its MD5. The same values are checked by torchvision
# (datasets.CIFAR10/CIFAR100 `tgz_md5`) and by Avalanche (TinyImagenet `md5`). Tests replace
# entries' checksums for their fake archives.
ARCHIVES: dict[str, Archive] = {
    "cifar-10-python.tar.gz": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                      "c58f30108f718f92721af3b95e74349a"),
    "cifar-100-python.tar.gz": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85"),
    "tiny-imagenet-200.zip": Archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                                     "90528d7ca1a48142e341f4ef8d21d0de"),
}


def allowed(download: bool = True) -> bool:
    """Whether a missing archive may be downloaded: `download` and no `JAXMEM_NO_DOWNLOAD`."""
    return download and os.environ.get(ENV_VAR, "").strip().lower() in ("", "0", "false", "no")


def _one_line(error: BaseException) -> str:
    if type(error) is urllib.error.URLError:  # not HTTPError, whose reason drops the status
        error = error.reason
    return " ".join(str(error).split()) or type(error).__name__


def source_url(filename: str, archive: Archive) -> str:
    """Where `filename` is fetched from: `$JAXMEM_DOWNLOAD_MIRROR/<its mirror path>`, else the
    official address."""
    mirror = os.environ.get(MIRROR_VAR, "").strip()
    return (f"{mirror.rstrip('/')}/{archive.mirror_path or filename}" if mirror
            else archive.url)


@contextlib.contextmanager
def locked(path: Path, waiting: str):
    """Hold an exclusive flock on `path` (created if missing; removed on release), printing
    `waiting` while another process holds it."""
    fd = lock_file(str(path), waiting)
    try:
        yield
    finally:
        Path(path).unlink(missing_ok=True)
        os.close(fd)


def fetch(filename: str, folder: Path, dataset: str, archive: Archive | None = None) -> Path:
    """Download `filename` into `folder` (or wait for a concurrent download of it), checked;
    returns its final path.

    `archive`: where it is published, default `ARCHIVES[filename]`; datasets whose files share
    names (MNIST and Fashion-MNIST) keep their own tables and pass the entry.
    """
    archive = archive or ARCHIVES[filename]
    target = folder / filename
    fix = (f"place {filename} (or its extracted folder) into {folder} yourself; "
           f"{OPT_OUT} skips the download")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with locked(folder / f"{filename}.lock",
                    f"{dataset}: waiting for another process's download of {filename}"):
            if target.is_file():  # downloaded by the process that held the lock before
                return target
            return _download(filename, archive, target, dataset, fix)
    except OSError as error:
        raise UserError(f"{dataset}: cannot write {filename} into {folder} "
                        f"({_one_line(error)}); choose a writable --data-dir, or {fix}") from None


def _download(filename: str, archive: Archive, target: Path, dataset: str, fix: str) -> Path:
    """Stream `filename` into a temporary file beside `target`, check its length and MD5,
    and rename it into place with the umask's permissions."""
    folder, url, md5 = target.parent, source_url(filename, archive), archive.md5
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{filename}-", suffix=".part")
    print(f"{dataset}: downloading {url} into {folder}", file=sys.stderr)
    try:
        digest, size, expected = hashlib.md5(usedforsecurity=False), 0, None
        try:
            with os.fdopen(fd, "wb") as out, \
                    urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                expected = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=expected, desc=filename, unit="B", unit_scale=True,
                          unit_divisor=1024, file=sys.stderr, disable=None, leave=False) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise UserError(f"{dataset}: cannot download {filename} from {url} "
                            f"({_one_line(error)}); {fix}") from None
        if expected is not None and size != expected:
            raise UserError(f"{dataset}: the download of {filename} from {url} stopped "
                            f"after {size:,} of {expected:,} bytes and was discarded; run again, "
                            f"or {fix}")
        if digest.hexdigest() != md5:
            raise UserError(f"{dataset}: {filename} downloaded from {url} has MD5 "
                            f"{digest.hexdigest()}, not the published {md5}, and was "
                            f"discarded; run again, or {fix}")
        os.chmod(temp, umask_mode())  # mkstemp's 0600 would shut out the group
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
