"""The embedded example CT: a real abdominal scan with organ labels, fetched from a pinned PyPI package.

The source distribution of ``totalsegmentator==2.18.0`` (Apache-2.0) ships a real non-contrast abdomen-pelvis
CT (122 x 101 x 112 voxels of 3 mm) and the TotalSegmentator "total" segmentation of it. The labels were made
by the TotalSegmentator model, not drawn by hand: a *silver standard*. This module

1. obtains the sdist with ``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0`` (pip's ordinary
   index configuration decides where from; nothing here names a host), unless the file is already there;
2. verifies its sha256 against the pinned value;
3. extracts only the CT, its label file and the licence (read member by member: no path in the archive decides
   where anything is written);
4. writes into the cache folder (default ``~/.cache/slicreg/example``; ``SLICREG_DATA`` replaces
   ``~/.cache/slicreg``):

   - ``example_ct.nii.gz`` -- int16 HU, grid as stored;
   - ``example_labels_btcv.nii.gz`` -- uint8, the 13 BTCV organ ids (:data:`slicreg.labels.TOTALSEG_TO_BTCV`);
   - ``example_labels_totalseg.nii.gz`` -- uint8, the original TotalSegmentator class ids (all ~60 present);
   - ``LICENSE`` -- the package's Apache-2.0 licence, which covers the data;
   - ``provenance.json`` -- where everything came from, hashes, label statistics.

A folder whose provenance and file hashes are complete is a cache hit: no pip call, nothing rewritten.
Without network, or if the hash does not match, one :class:`~slicreg.errors.InputError` says what to do
(place the sdist at a given path and rerun).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.io import atomic_write_bytes, atomic_write_json, read_json, save_volume, sha256_file
from slicreg.labels import BTCV_LABELS, TOTALSEG_NAMES, TOTALSEG_TO_BTCV, relabel

__all__ = [
    "PACKAGE",
    "VERSION",
    "REQUIREMENT",
    "SDIST_FILENAME",
    "SDIST_SHA256",
    "SDIST_BYTES",
    "MEMBERS",
    "FORMAT",
    "ExampleFiles",
    "default_data_root",
    "default_example_dir",
    "example_files",
    "cached_example",
    "verify_sdist",
    "download_sdist",
    "convert_example",
    "extract_example",
    "fetch_example",
]

log = logging.getLogger(__name__)

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
SDIST_FILENAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
SDIST_BYTES = 38_049_988
PIP_ARGS = ("download", "--no-deps", "--no-binary", ":all:")
"""``pip`` arguments before ``-d DIR REQUIREMENT``: the source distribution only, nothing installed."""

MEMBERS = {
    "ct": "tests/reference_files/example_ct.nii.gz",
    "seg": "tests/reference_files/example_seg_fast_force_split.nii.gz",
    "licence": "LICENSE",
}
"""The archive members used, relative to the sdist's top folder (``totalsegmentator-2.18.0/``)."""

FORMAT = "slicreg-example/1"
"""Version of the extracted layout; a cache folder with another format is rebuilt (from the kept sdist)."""

IMAGE_NAME = "example_ct.nii.gz"
LABELS_NAME = "example_labels_btcv.nii.gz"
TOTALSEG_NAME = "example_labels_totalseg.nii.gz"
LICENCE_NAME = "LICENSE"
PROVENANCE_NAME = "provenance.json"
OUTPUT_NAMES = (IMAGE_NAME, LABELS_NAME, TOTALSEG_NAME, LICENCE_NAME, PROVENANCE_NAME)

_MAX_MEMBER_BYTES = 64 << 20  # the members are a few MB; refuse anything absurd


# ------------------------------------------------------------------------------------------------- places
def default_data_root() -> Path:
    """Root of slicreg's data cache: ``$SLICREG_DATA`` if set, else ``$XDG_CACHE_HOME/slicreg`` or
    ``~/.cache/slicreg``."""
    env = os.environ.get("SLICREG_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "slicreg"


def default_example_dir() -> Path:
    """Where the example lives by default: ``<data root>/example``."""
    return default_data_root() / "example"


@dataclass(frozen=True)
class ExampleFiles:
    """The files of an extracted example folder (all in ``folder``)."""

    folder: Path
    image: Path
    labels: Path
    labels_totalseg: Path
    licence: Path
    provenance: Path

    def all(self) -> tuple[Path, ...]:
        """Every file, in the order of :data:`OUTPUT_NAMES`."""
        return (self.image, self.labels, self.labels_totalseg, self.licence, self.provenance)


def example_files(folder: str | os.PathLike) -> ExampleFiles:
    """The paths of the example files inside ``folder`` (whether or not they exist)."""
    folder = Path(folder)
    return ExampleFiles(folder, folder / IMAGE_NAME, folder / LABELS_NAME, folder / TOTALSEG_NAME,
                        folder / LICENCE_NAME, folder / PROVENANCE_NAME)


def cached_example(folder: str | os.PathLike | None = None, *, sha256: str = SDIST_SHA256) -> ExampleFiles | None:
    """The example in ``folder`` (default :func:`default_example_dir`) if it is complete and intact, else None.

    Complete means: ``provenance.json`` has the current :data:`FORMAT` and the sdist hash ``sha256`` (the pinned
    one), and every output file exists with the sha256 recorded there."""
    files = example_files(default_example_dir() if folder is None else folder)
    try:
        prov = read_json(files.provenance)
    except InputError:
        return None
    if not isinstance(prov, dict) or prov.get("format") != FORMAT:
        return None
    if prov.get("source", {}).get("sha256") != sha256:
        return None
    recorded = prov.get("outputs", {})
    for path in files.all()[:-1]:
        if not path.is_file() or recorded.get(path.name) != sha256_file(path):
            return None
    return files


# ------------------------------------------------------------------------------------------------- the sdist
def verify_sdist(path: str | os.PathLike, *, sha256: str = SDIST_SHA256, place_at: Path | None = None) -> None:
    """Check that ``path`` is the pinned sdist (sha256); raise :class:`InputError` saying what to do if not."""
    path = Path(path)
    where = place_at or path
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected the source distribution {SDIST_FILENAME}); "
                         f"place it at {where} and rerun")
    got = sha256_file(path)
    if got != sha256:
        raise InputError(
            f"{path}: sha256 {got} ({path.stat().st_size} bytes) does not match the pinned {SDIST_FILENAME} "
            f"(sha256 {sha256}, {SDIST_BYTES} bytes): the file is damaged or another release. Delete it and "
            f"rerun to download it again, or place the correct file at {where} and rerun")


def _pip_download(target_dir: Path) -> subprocess.CompletedProcess:
    """Run ``python -m pip download --no-deps --no-binary :all: -d target_dir totalsegmentator==2.18.0``."""
    cmd = [sys.executable, "-m", "pip", *PIP_ARGS, "--disable-pip-version-check", "--no-input",
           "--retries", "2", "--timeout", "30", "-d", str(target_dir), REQUIREMENT]
    log.info("downloading %s with pip (about 38 MB)", REQUIREMENT)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 1, "", f"{type(exc).__name__}: {exc}")


def _offline_help(place_at: Path) -> str:
    return (f"Without network access: on a machine that has it run `pip download --no-deps --no-binary :all: "
            f"-d . {REQUIREMENT}`, copy the resulting {SDIST_FILENAME} ({SDIST_BYTES} bytes, sha256 "
            f"{SDIST_SHA256}) to {place_at} and rerun (or pass its path with --sdist FILE)")


def download_sdist(folder: str | os.PathLike, *, sha256: str = SDIST_SHA256) -> Path:
    """Download the pinned sdist into ``folder`` with pip, verify it, and return its path.

    The download goes to a temporary folder beside the target and is moved into place only after its hash
    checked out, so ``folder/totalsegmentator-2.18.0.tar.gz`` is either absent or the verified file.

    Raises:
        InputError: pip failed (offline, index unreachable) or the file's hash is wrong; the message says where
            to place the file by hand.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / SDIST_FILENAME
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        result = _pip_download(Path(tmp))
        found = sorted(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not found:
            tail = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
            said = tail[-1] if tail else f"exit status {result.returncode}"
            raise InputError(f"could not download {REQUIREMENT} with pip ({said}). {_offline_help(final)}")
        got = found[0]
        verify_sdist(got, sha256=sha256, place_at=final)
        os.replace(got, final)
    return final


# ---------------------------------------------------------------------------------------------- conversion
def convert_example(ct: Volume, seg: Volume, *, name: str = "example") -> tuple[Volume, Volume, Volume]:
    """Turn the extracted CT and TotalSegmentator labels into the files slicreg uses.

    Args:
        ct: ``(X, Y, Z)`` CT in HU (integer values).
        seg: ``(X, Y, Z)`` TotalSegmentator class ids on the CT's grid.
        name: how to call the pair in messages.

    Returns:
        ``(ct int16, labels uint8 BTCV ids, labels uint8 TotalSegmentator ids)``, all on the CT's grid.

    Raises:
        InputError: different grids, non-integer HU or labels, values that do not fit int16 / uint8.
    """
    hu = np.asarray(ct.array)
    if hu.dtype.kind == "f" and not np.all(hu == np.round(hu)):
        raise InputError(f"{name}: expected integer HU values in the CT, found fractions")
    lo, hi = int(np.min(hu)), int(np.max(hu))
    if lo < np.iinfo(np.int16).min or hi > np.iinfo(np.int16).max:
        raise InputError(f"{name}: CT values {lo}..{hi} do not fit int16")
    if not ct.same_grid(seg, atol_mm=1e-3):
        raise InputError(f"{name}: the segmentation's grid (shape {seg.shape}) differs from the CT's "
                         f"(shape {ct.shape}); expected the same grid")
    ids = np.asarray(seg.array)
    if ids.dtype.kind == "f":
        if not np.all(ids == np.round(ids)):
            raise InputError(f"{name}: the segmentation holds non-integer values")
        ids = ids.astype(np.int64)
    if ids.dtype.kind not in "iub" or (ids.size and (int(ids.min()) < 0 or int(ids.max()) > 255)):
        raise InputError(f"{name}: expected segmentation class ids in 0..255, got {int(ids.min())}..{int(ids.max())}")
    totalseg = ids.astype(np.uint8)
    btcv = relabel(totalseg, TOTALSEG_TO_BTCV, dtype=np.uint8)
    meta = {"source": ct.meta.get("source", name)}
    return (Volume(hu.astype(np.int16), ct.affine, meta), Volume(btcv, ct.affine, meta),
            Volume(totalseg, ct.affine, meta))


def _find_member(tar: tarfile.TarFile, relative: str, archive: Path) -> tarfile.TarInfo:
    """The regular-file member ``<top folder>/<relative>`` (exactly one top folder, as in every sdist)."""
    candidates = [m for m in tar.getmembers()
                  if m.name.split("/", 1)[-1] == relative and m.name.count("/") == relative.count("/") + 1]
    if not candidates:
        raise InputError(f"{archive}: member */{relative} not found; expected the {SDIST_FILENAME} source "
                         f"distribution")
    member = candidates[0]
    if not member.isfile() or member.size > _MAX_MEMBER_BYTES:
        raise InputError(f"{archive}: member {member.name} is not a regular file of sensible size")
    return member


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:
        raise InputError(f"{archive}: cannot read member {member.name}")
    with fh:
        return fh.read()


def _volume_stats(labels: np.ndarray, voxel_ml: float, names: dict[int, str]) -> dict[str, Any]:
    ids, counts = np.unique(labels, return_counts=True)
    return {str(int(i)): {"name": names.get(int(i), ""), "voxels": int(c), "volume_ml": round(float(c) * voxel_ml, 2)}
            for i, c in zip(ids, counts) if i != 0}


def extract_example(sdist: str | os.PathLike, dest: str | os.PathLike, *, sha256: str = SDIST_SHA256
                    ) -> ExampleFiles:
    """Verify ``sdist``, extract the CT, labels and licence, convert them and write the example folder.

    Args:
        sdist: the ``totalsegmentator-2.18.0.tar.gz`` source distribution.
        dest: output folder (created).
        sha256: the expected hash (the pinned one; tests pass the hash of a small fake archive).

    Returns:
        The written :class:`ExampleFiles`. Every file is written atomically; ``provenance.json`` last, so a
        folder with a valid provenance is complete.
    """
    from slicreg.io import load_volume

    sdist, dest = Path(sdist), Path(dest)
    verify_sdist(sdist, sha256=sha256, place_at=dest / SDIST_FILENAME)
    dest.mkdir(parents=True, exist_ok=True)
    files = example_files(dest)
    try:
        tar = tarfile.open(sdist, "r:gz")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{sdist}: not a readable .tar.gz archive ({exc})") from None
    with tar, tempfile.TemporaryDirectory(prefix=".extract-", dir=dest) as tmp:
        members = {key: _find_member(tar, rel, sdist) for key, rel in MEMBERS.items()}
        blobs = {key: _read_member(tar, m, sdist) for key, m in members.items()}
        for key in ("ct", "seg"):
            (Path(tmp) / f"{key}.nii.gz").write_bytes(blobs[key])
        ct = load_volume(Path(tmp) / "ct.nii.gz", kind="any")
        seg = load_volume(Path(tmp) / "seg.nii.gz", kind="labels")
    image, btcv, totalseg = convert_example(ct, seg, name=str(sdist))

    save_volume(image, files.image, dtype=np.int16)
    save_volume(btcv, files.labels, dtype=np.uint8)
    save_volume(totalseg, files.labels_totalseg, dtype=np.uint8)
    atomic_write_bytes(files.licence, blobs["licence"])

    import nibabel as nib

    voxel_ml = float(np.prod(image.spacing_mm)) / 1000.0
    btcv_stats = _volume_stats(btcv.array, voxel_ml, BTCV_LABELS)
    provenance = {
        "format": FORMAT,
        "source": {
            "package": PACKAGE, "version": VERSION, "distribution": "sdist", "file": SDIST_FILENAME,
            "sha256": sha256, "bytes": sdist.stat().st_size,
            "obtained_with": f"pip {' '.join(PIP_ARGS)} -d DIR {REQUIREMENT}",
            "members": {members[k].name: {"sha256": _sha256_bytes(blobs[k]), "bytes": len(blobs[k])}
                        for k in MEMBERS},
        },
        "licence": "Apache-2.0 (the licence of the totalsegmentator package, in LICENSE beside this file)",
        "labels": {
            "kind": "silver standard: made by the TotalSegmentator model (task 'total', fast, force split), "
                    "not drawn by hand",
            "totalseg_to_btcv": {str(k): v for k, v in TOTALSEG_TO_BTCV.items()},
            "totalseg_names": {str(k): v for k, v in TOTALSEG_NAMES.items()},
            "btcv_names": {str(k): v for k, v in BTCV_LABELS.items()},
            "btcv_present": btcv_stats,
            "btcv_absent": [i for i in BTCV_LABELS if str(i) not in btcv_stats],
            "totalseg_present": sorted(int(i) for i in np.unique(totalseg.array) if i != 0),
        },
        "image": {
            "shape": list(image.shape), "spacing_mm": [round(float(s), 6) for s in image.spacing_mm],
            "axcodes": "".join(nib.aff2axcodes(image.affine)), "affine": image.affine.tolist(),
            "hu_min": int(image.array.min()), "hu_max": int(image.array.max()), "dtype": "int16",
        },
        "outputs": {p.name: sha256_file(p) for p in files.all()[:-1]},
    }
    atomic_write_json(files.provenance, provenance)
    return files


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` so that two fetches of the same folder do not interleave."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_example(dest: str | os.PathLike | None = None, *, sdist: str | os.PathLike | None = None,
                  download: bool = True, sha256: str = SDIST_SHA256) -> ExampleFiles:
    """Make sure the example folder exists and is intact; return its files.

    Order: a complete folder is returned as it is (no pip call); otherwise the sdist is taken from ``sdist``
    if given, else from ``dest/totalsegmentator-2.18.0.tar.gz`` if present, else downloaded there with pip
    (``download=True``); then verified and extracted. The sdist is kept in ``dest`` so that a newer extraction
    format can be rebuilt without network.

    Args:
        dest: the example folder (default :func:`default_example_dir`).
        sdist: a local copy of ``totalsegmentator-2.18.0.tar.gz`` to use instead of downloading.
        download: allow the pip download (False: fail with instructions if no local sdist is found).
        sha256: expected sdist hash (the pinned one; tests use fake archives).

    Raises:
        InputError: offline or hash mismatch, with instructions (where to place the file).
    """
    dest = Path(default_example_dir() if dest is None else dest).expanduser()
    if (hit := cached_example(dest, sha256=sha256)) is not None:
        return hit
    with _locked(dest):
        if (hit := cached_example(dest, sha256=sha256)) is not None:  # another process made it meanwhile
            return hit
        kept = dest / SDIST_FILENAME
        if sdist is not None:
            source = Path(sdist).expanduser()
            verify_sdist(source, sha256=sha256, place_at=kept)
            if source.resolve() != kept.resolve():
                with contextlib.suppress(OSError):
                    tmp = kept.with_name(f".{SDIST_FILENAME}.copy")
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, kept)
        elif kept.is_file():
            source = kept
        elif download:
            source = download_sdist(dest, sha256=sha256)
        else:
            raise InputError(f"{kept}: the example's source distribution is not there and downloading is off. "
                             f"{_offline_help(kept)}")
        return extract_example(source, dest, sha256=sha256)
