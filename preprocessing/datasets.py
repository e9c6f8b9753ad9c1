"""Dataset folders: the project's ``dataset.json``, BTCV and Learn2Reg AbdomenCTCT, read into one type.

Every downstream stage sees a :class:`Dataset`: subjects (image, optional labels, role, tags), the template,
the training and test lists, and the registration pairs (with an optional ground-truth field each). Three
layouts are read (docs/CONTRACTS.md describes the first):

``slicreg``
    ``dataset.json`` (format ``slicreg-dataset/1``) with ``subjects``, ``template``, ``training``, ``test``,
    ``registration_pairs``; paths relative to the folder or absolute.
``btcv``
    ``img/imgNNNN.nii.gz`` and ``label/labelNNNN.nii.gz`` (also found under ``Training/`` or
    ``RawData/Training/``). The SLIC-Reg paper's split (docs/method.md, section 1): 20 training scans, #38 the
    template, the other 9 test scans registered to it (fixed = test scan, moving = template). Subject ids are
    ``btcv_NNNN``; scans outside the split get the role ``unused``.
``learn2reg``
    ``imagesTr/<name>_NNNN_0000.nii.gz``, label maps ``labelsTr/<name>_NNNN_0000.nii.gz`` (the current release:
    the image path with ``images`` replaced by ``labels``, the rule of Learn2Reg's evaluation) or
    ``labelsTr/<name>_NNNN.nii.gz`` (older releases), and ``<name>_dataset.json`` with its ``training``,
    ``test``, ``registration_val`` and ``registration_test`` lists. Scans in a pair (or in the ``test`` list)
    are test scans, the others training scans; the pairs are ``registration_val`` then ``registration_test``
    (when its images are present) as given, each tagged with its list (``Pair.extra["learn2reg"]``). Each
    subject keeps its Learn2Reg case number and modality (``Subject.extra["learn2reg"]``), from which a
    submission's file names are made (:mod:`preprocessing.learn2reg`). Learn2Reg names no template: the first
    scan of the validation pairs is used unless one is chosen. Subject ids are ``<name>_NNNN`` (modality
    ``0000``) or ``<name>_NNNN_MMMM`` (another modality, e.g. the second scan of a paired task).

Everything is validated before any work starts: missing files, image / label grids that differ, duplicate
ids, unknown ids in lists or pairs. All problems come back together in one
:class:`~slicreg.errors.InputError`. With ``partial=True`` a BTCV or Learn2Reg folder may hold only some of the
scans its split or json lists (inference on the scans a user has): the absent ones are left out and listed in
:attr:`Dataset.notes`, and so are the pairs they were part of.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from slicreg.errors import InputError
from slicreg.io import atomic_write_json
from slicreg.labels import BTCV_LABELS, label_names_json

__all__ = [
    "DATASET_FORMAT",
    "DATASET_JSON",
    "LAYOUTS",
    "ROLES",
    "BTCV_TRAIN",
    "BTCV_TEST",
    "BTCV_TEMPLATE",
    "Subject",
    "Pair",
    "Dataset",
    "detect_layout",
    "load_dataset",
    "dataset_problems",
    "validate_dataset",
    "dataset_to_json",
    "write_dataset_json",
    "image_relpath",
    "labels_relpath",
    "field_relpath",
    "btcv_id",
    "subjects_with_role",
    "LEARN2REG_SETS",
    "learn2reg_name_parts",
    "learn2reg_label_candidates",
]

DATASET_FORMAT = "slicreg-dataset/1"
DATASET_JSON = "dataset.json"
LAYOUTS = ("slicreg", "btcv", "learn2reg")
ROLES = ("template", "train", "test", "unused")
SUBJECT_FILE_KEYS = ("transform", "crop")
"""Optional per-subject file entries of dataset.json (paths, resolved and checked like image and labels)."""

BTCV_TRAIN = (2, 3, 5, 6, 8, 9, 21, 22, 24, 25, 27, 28, 30, 31, 33, 34, 36, 37, 39, 40)
BTCV_TEST = (1, 4, 7, 10, 23, 26, 29, 32, 35)
BTCV_TEMPLATE = 38
"""The SLIC-Reg / Learn2Reg 2020 task 3 split of BTCV (the template #38 belongs to the test half)."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NIFTI_RE = r"\.nii(?:\.gz)?"


# ----------------------------------------------------------------------------------------------- the types
@dataclass(frozen=True)
class Subject:
    """One scan of a dataset.

    Attributes:
        id: unique name, usable in file names (letters, digits, ``.``, ``_``, ``-``).
        image: the CT (absolute path, or relative to the dataset root).
        labels: the organ label map on the image's grid, or ``None``.
        role: ``"template"``, ``"train"``, ``"test"`` or ``"unused"``.
        tags: free labels such as ``"slab"``.
        files: further per-subject files by key (``"transform"``: the cohort map to the source scan,
            ``"crop"``: the preprocessing record).
        extra: any other JSON keys of the subject entry, kept verbatim.
    """

    id: str
    image: Path
    labels: Path | None = None
    role: str = "unused"
    tags: tuple[str, ...] = ()
    files: dict[str, Path] = field(default_factory=dict, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Pair:
    """A registration pair (fixed and moving subject ids), optionally with its true field.

    ``ground_truth_field``: NIfTI ``(X, Y, Z, 3)`` on the fixed subject's image grid, voxels, fixed -> moving
    (``fixed voxel q`` corresponds to ``moving voxel q + u(q)`` of the moving subject's own grid)."""

    fixed: str
    moving: str
    ground_truth_field: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Dataset:
    """A validated dataset folder (see the module docstring). Paths are absolute after :func:`load_dataset`."""

    root: Path
    name: str
    subjects: dict[str, Subject]
    template: str | None = None
    training: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=lambda: dict(BTCV_LABELS))
    description: str = ""
    layout: str = "slicreg"
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ground_truth_fields(self) -> dict[tuple[str, str], Path]:
        """``(fixed, moving) -> field path`` for the pairs that have one."""
        return {(p.fixed, p.moving): self.path(p.ground_truth_field) for p in self.pairs
                if p.ground_truth_field is not None}

    def path(self, p: Path | str) -> Path:
        """A subject/pair path made absolute (relative paths are relative to :attr:`root`)."""
        p = Path(p)
        return p if p.is_absolute() else self.root / p

    def subject(self, subject_id: str) -> Subject:
        """The subject ``subject_id``; an unknown id raises :class:`InputError` listing the known ones."""
        if subject_id not in self.subjects:
            raise InputError(f"dataset {self.name!r}: unknown subject {subject_id!r}; known: "
                             f"{', '.join(sorted(self.subjects)) or 'none'}")
        return self.subjects[subject_id]


def image_relpath(subject_id: str) -> str:
    """Where a dataset folder keeps a subject's image: ``imagesTr/<id>_0000.nii.gz``."""
    return f"imagesTr/{subject_id}_0000.nii.gz"


def labels_relpath(subject_id: str) -> str:
    """Where a dataset folder keeps a subject's labels: ``labelsTr/<id>.nii.gz``."""
    return f"labelsTr/{subject_id}.nii.gz"


def field_relpath(fixed: str, moving: str) -> str:
    """Where a dataset folder keeps a pair's true field: ``ground_truth_fields/disp_<fixed>_<moving>.nii.gz``."""
    return f"ground_truth_fields/disp_{fixed}_{moving}.nii.gz"


# ----------------------------------------------------------------------------------------------- reading
class _Problems:
    """Collects problems so that all of them are reported at once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise InputError(_format_problems(self.where, self.items))


def _format_problems(where: str, items: list[str]) -> str:
    shown = items[:40]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{where}: {len(items)} problem(s) found before any work started:\n" + \
        "\n".join(f"  - {p}" for p in shown) + more


def _load_json_strict(path: Path, problems: _Problems) -> Any:
    """Read JSON and report duplicate keys (json.loads would silently keep the last one)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                problems.add(f"{path.name}: duplicate key {key!r}")
            out[key] = value
        return out

    if not path.is_file():
        raise InputError(f"{path}: file not found (expected a dataset JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def detect_layout(folder: str | os.PathLike) -> str:
    """Guess the layout of a dataset folder: ``"slicreg"``, ``"btcv"`` or ``"learn2reg"``."""
    folder = Path(folder)
    if folder.is_file():
        return "learn2reg" if folder.name != DATASET_JSON else "slicreg"
    if (folder / DATASET_JSON).is_file():
        try:
            doc = json.loads((folder / DATASET_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "slicreg"
        if isinstance(doc, dict) and "subjects" in doc:
            return "slicreg"
        return "learn2reg"
    if list(folder.glob("*_dataset.json")) or (folder / "imagesTr").is_dir():
        return "learn2reg"
    if _btcv_base(folder) is not None:
        return "btcv"
    raise InputError(f"{folder}: cannot tell the dataset layout: expected dataset.json (slicreg), img/ and "
                     f"label/ (BTCV) or imagesTr/ with *_dataset.json (Learn2Reg)")


def load_dataset(folder: str | os.PathLike, *, layout: str = "auto", template: str | None = None,
                 check: bool = True, check_grids: bool = True, partial: bool = False) -> Dataset:
    """Read a dataset folder and validate it.

    Args:
        folder: the dataset folder (or, for slicreg / learn2reg, its JSON file).
        layout: ``"slicreg"``, ``"btcv"``, ``"learn2reg"`` or ``"auto"`` (:func:`detect_layout`).
        template: choose another template subject (an id, or for BTCV also the scan number such as ``"38"``).
        check: validate files (existence, grids); problems raise one :class:`InputError` listing them all.
        check_grids: compare image and label headers (shape and affine).
        partial: BTCV / Learn2Reg: accept a folder with only some of the listed scans (the absent ones and their
            pairs are left out and listed in :attr:`Dataset.notes`); otherwise every absent scan is a problem.

    Returns:
        The :class:`Dataset` with absolute paths.
    """
    folder = Path(folder).expanduser().absolute()
    if not folder.exists():
        raise InputError(f"{folder}: dataset folder not found")
    if layout == "auto":
        layout = detect_layout(folder)
    if layout not in LAYOUTS:
        raise InputError(f"layout: expected one of {', '.join(LAYOUTS)} or auto, got {layout!r}")
    problems = _Problems(str(folder))
    if layout == "slicreg":
        dataset = _read_slicreg(folder, problems)
    else:
        dataset = (_read_btcv if layout == "btcv" else _read_learn2reg)(folder, problems, partial=partial)
    if template is not None:
        dataset = _with_template(dataset, template)
    elif layout == "btcv" and dataset.template is None and partial:
        problems.add(f"the template, scan #{BTCV_TEMPLATE} (img{BTCV_TEMPLATE:04d}.nii.gz), is not in the folder: "
                     f"choose another scan as the template (template = \"<scan number>\" in the dataset stage)")
    problems.items += dataset_problems(dataset, check_files=check, check_grids=check and check_grids)
    problems.raise_if_any()
    return dataset


def _as_path(value: Any, root: Path, what: str, problems: _Problems) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.add(f"{what}: expected a path string, got {value!r}")
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p)


def _read_slicreg(folder: Path, problems: _Problems) -> Dataset:
    path = folder if folder.is_file() else folder / DATASET_JSON
    root = path.parent
    problems.where = str(path)
    doc = _load_json_strict(path, problems)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format", DATASET_FORMAT)
    if fmt != DATASET_FORMAT:
        problems.add(f"format: expected {DATASET_FORMAT!r}, got {fmt!r}")
    raw_subjects = doc.get("subjects")
    if not isinstance(raw_subjects, dict) or not raw_subjects:
        problems.add("subjects: expected a non-empty object {id: {image, labels, role}}")
        raw_subjects = {}
    subjects: dict[str, Subject] = {}
    for sid, entry in raw_subjects.items():
        where = f"subjects.{sid}"
        if not isinstance(entry, dict):
            problems.add(f"{where}: expected an object with 'image', got {type(entry).__name__}")
            continue
        image = _as_path(entry.get("image"), root, f"{where}.image", problems)
        if image is None:
            problems.add(f"{where}: 'image' is missing")
            continue
        tags = entry.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            problems.add(f"{where}.tags: expected a list of strings, got {tags!r}")
            tags = []
        files = {}
        for key in SUBJECT_FILE_KEYS:
            p = _as_path(entry.get(key), root, f"{where}.{key}", problems)
            if p is not None:
                files[key] = p
        known = {"image", "labels", "role", "tags", *SUBJECT_FILE_KEYS}
        subjects[sid] = Subject(
            id=sid, image=image, labels=_as_path(entry.get("labels"), root, f"{where}.labels", problems),
            role=str(entry.get("role", "")), tags=tuple(tags), files=files,
            extra={k: v for k, v in entry.items() if k not in known})

    def id_list(key: str) -> list[str] | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.add(f"{key}: expected a list of subject ids, got {value!r}")
            return []
        return list(value)

    training, test = id_list("training"), id_list("test")
    template = doc.get("template")
    if template is not None and not isinstance(template, str):
        problems.add(f"template: expected a subject id, got {template!r}")
        template = None
    # roles and lists complete each other; where both are given they must agree (checked in validation)
    if template is None:
        tagged = [s.id for s in subjects.values() if s.role == "template"]
        template = tagged[0] if len(tagged) == 1 else None
        if len(tagged) > 1:
            problems.add(f"several subjects have role 'template': {', '.join(tagged)}")
    if training is None:
        training = [s.id for s in subjects.values() if s.role == "train"]
    if test is None:
        test = [s.id for s in subjects.values() if s.role == "test"]
    for sid, s in list(subjects.items()):
        if not s.role:
            role = ("template" if sid == template else "train" if sid in training else
                    "test" if sid in test else "unused")
            subjects[sid] = replace(s, role=role)

    pairs: list[Pair] = []
    raw_pairs = doc.get("registration_pairs", [])
    if not isinstance(raw_pairs, list):
        problems.add(f"registration_pairs: expected a list of {{fixed, moving}}, got {type(raw_pairs).__name__}")
        raw_pairs = []
    for i, entry in enumerate(raw_pairs):
        if not isinstance(entry, dict) or not isinstance(entry.get("fixed"), str) \
                or not isinstance(entry.get("moving"), str):
            problems.add(f"registration_pairs[{i}]: expected {{\"fixed\": id, \"moving\": id}}, got {entry!r}")
            continue
        gt = _as_path(entry.get("ground_truth_field"), root, f"registration_pairs[{i}].ground_truth_field",
                      problems)
        pairs.append(Pair(entry["fixed"], entry["moving"], gt,
                          {k: v for k, v in entry.items() if k not in ("fixed", "moving", "ground_truth_field")}))

    labels = _parse_labels(doc.get("labels"), problems)
    known_top = {"name", "description", "format", "labels", "template", "subjects", "training", "test",
                 "registration_pairs"}
    return Dataset(root=root, name=str(doc.get("name", root.name)), subjects=subjects, template=template,
                   training=training, test=test, pairs=pairs, labels=labels,
                   description=str(doc.get("description", "")), layout="slicreg",
                   extra={k: v for k, v in doc.items() if k not in known_top})


def _parse_labels(value: Any, problems: _Problems) -> dict[int, str]:
    """``{"0": "background", "1": "spleen"}`` or Learn2Reg's ``{"0": {"1": "spleen", ...}}`` -> {1: "spleen"}."""
    if value is None:
        return dict(BTCV_LABELS)
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), dict):
        value = next(iter(value.values()))
    out: dict[int, str] = {}
    if not isinstance(value, dict):
        problems.add(f"labels: expected an object {{id: name}}, got {type(value).__name__}")
        return dict(BTCV_LABELS)
    for k, v in value.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            problems.add(f"labels: key {k!r} is not an integer id")
            continue
        if key != 0:
            out[key] = str(v)
    return out or dict(BTCV_LABELS)


def _btcv_base(folder: Path) -> Path | None:
    for base in (folder, folder / "Training", folder / "RawData" / "Training"):
        if (base / "img").is_dir():
            return base
    return None


def _scan_numbered(folder: Path, stem: str, problems: _Problems) -> dict[int, Path]:
    """``<stem>NNNN.nii[.gz]`` files of ``folder`` by number; two files with one number are a duplicate."""
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    pattern = re.compile(rf"^{stem}(\d+){_NIFTI_RE}$")
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m:
            n = int(m.group(1))
            if n in found:
                problems.add(f"duplicate id: {found[n].name} and {p.name} are both scan #{n}")
            else:
                found[n] = p
    return found


def btcv_id(number: int) -> str:
    """Subject id of BTCV scan ``number``: ``btcv_0038``."""
    return f"btcv_{number:04d}"


def _read_btcv(folder: Path, problems: _Problems, *, partial: bool = False) -> Dataset:
    base = _btcv_base(folder)
    if base is None:
        raise InputError(f"{folder}: expected the BTCV layout img/imgNNNN.nii.gz and label/labelNNNN.nii.gz "
                         f"(also under Training/ or RawData/Training/); no img/ folder found")
    images = _scan_numbered(base / "img", "img", problems)
    labels = _scan_numbered(base / "label", "label", problems)
    if not images:
        problems.add(f"{base / 'img'}: no imgNNNN.nii.gz files")
    for n in sorted(set(labels) - set(images)):
        problems.add(f"{labels[n]}: label map without an image (expected {base / 'img'}/img{n:04d}.nii.gz)")
    split = {**{n: "train" for n in BTCV_TRAIN}, **{n: "test" for n in BTCV_TEST}, BTCV_TEMPLATE: "template"}
    notes: list[str] = []
    absent_scans, absent_labels = [], []
    for n in sorted(split):
        if n not in images:
            absent_scans.append(n)
            if not partial:
                problems.add(f"missing file: {base / 'img'}/img{n:04d}.nii.gz (scan #{n} of the paper's split, "
                             f"role {split[n]})")
        elif n not in labels:
            absent_labels.append(n)
            if not partial:
                problems.add(f"missing file: {base / 'label'}/label{n:04d}.nii.gz (labels of scan #{n})")
    if partial and absent_scans:
        notes.append(f"{len(absent_scans)} scan(s) of the paper's split are not in {base / 'img'} and are left out: "
                     + ", ".join(f"#{n} ({split[n]})" for n in absent_scans))
    if partial and absent_labels:
        notes.append(f"no label map for scan(s) {', '.join(f'#{n}' for n in absent_labels)}: they are registered "
                     f"but not scored")
    if not images:
        problems.raise_if_any()
    subjects = {btcv_id(n): Subject(btcv_id(n), images[n], labels.get(n), split.get(n, "unused"))
                for n in sorted(images)}
    template = btcv_id(BTCV_TEMPLATE) if BTCV_TEMPLATE in images else None
    test = [btcv_id(n) for n in BTCV_TEST if n in images]
    return Dataset(
        root=base, name="btcv", subjects=subjects, template=template,
        training=[btcv_id(n) for n in BTCV_TRAIN if n in images], test=test,
        pairs=[Pair(t, template) for t in test] if template else [],
        description="BTCV abdominal CT with the SLIC-Reg split (20 training scans, #38 template, 9 test scans "
                    "registered to it)", layout="btcv", notes=notes)


LEARN2REG_SETS = ("registration_val", "registration_test")
"""The pair lists of a Learn2Reg dataset json (``registration_test`` pairs need their images on disk)."""

_L2R_NAME_RE = re.compile(rf"^(?P<task>.+)_(?P<case>\d{{4}})_(?P<modality>\d{{4}}){_NIFTI_RE}$")


def learn2reg_name_parts(image: str | os.PathLike) -> tuple[str, str, str] | None:
    """``.../AbdomenCTCT_0001_0000.nii.gz`` -> ``("AbdomenCTCT", "0001", "0000")`` (task, case, modality); ``None``
    for a name that is not ``<task>_NNNN_MMMM.nii[.gz]``."""
    m = _L2R_NAME_RE.match(Path(image).name)
    return (m.group("task"), m.group("case"), m.group("modality")) if m else None


def _learn2reg_id(image: Path) -> str:
    """``AbdomenCTCT_0001_0000.nii.gz`` -> ``AbdomenCTCT_0001``: the modality ``_0000`` is dropped; another
    modality is kept (``ThoraxCBCT_0001_0001``), so the two scans of a paired task get two ids."""
    parts = learn2reg_name_parts(image)
    if parts is not None:
        task, case, modality = parts
        return f"{task}_{case}" if modality == "0000" else f"{task}_{case}_{modality}"
    stem = re.sub(rf"{_NIFTI_RE}$", "", image.name)
    return re.sub(r"_\d{4}$", "", stem)


def learn2reg_label_candidates(image: str | os.PathLike) -> list[Path]:
    """Where a Learn2Reg release keeps an image's label map, in the order they are tried.

    First the image path with the folder ``images*`` renamed ``labels*`` (the rule of Learn2Reg's evaluation
    script, which gives ``labelsTr/AbdomenCTCT_0001_0000.nii.gz`` in the current release), then the same without
    the modality suffix (older releases: ``labelsTr/AbdomenCTCT_0001.nii.gz``)."""
    image = Path(image)
    folder = image.parent
    if folder.name.startswith("images"):
        folder = folder.with_name("labels" + folder.name[len("images"):])
    found = [folder / image.name]
    parts = learn2reg_name_parts(image)
    if parts is not None:
        suffix = ".nii.gz" if image.name.endswith(".gz") else ".nii"
        found.append(folder / f"{parts[0]}_{parts[1]}{suffix}")
    return found


def _learn2reg_label(image: Path, listed: Path | None) -> Path | None:
    """The label map of ``image``: the json's entry when it exists on disk, else the first existing candidate of
    :func:`learn2reg_label_candidates`; the json's entry (reported missing later) when none exists."""
    if listed is not None and listed.is_file():
        return listed
    for candidate in learn2reg_label_candidates(image):
        if candidate.is_file():
            return candidate
    return listed


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_learn2reg(folder: Path, problems: _Problems, *, partial: bool = False) -> Dataset:
    if folder.is_file():
        json_path: Path | None = folder
        root = folder.parent
    else:
        root = folder
        found = sorted(root.glob("*_dataset.json"))
        if len(found) > 1:
            raise InputError(f"{root}: several *_dataset.json files ({', '.join(p.name for p in found)}); pass "
                             f"the one to use as the dataset path")
        json_path = found[0] if found else (root / DATASET_JSON if (root / DATASET_JSON).is_file() else None)
    subjects: dict[str, Subject] = {}
    image_to_id: dict[Path, str] = {}
    pairs: list[Pair] = []
    name = root.name
    labels_map: dict[int, str] = dict(BTCV_LABELS)
    notes: list[str] = []
    absent: set[Path] = set()  # listed images not on disk (left out with partial, or test images not shipped)
    listed_test: list[str] = []

    def add(image: Path, label: Path | None, what: str) -> str | None:
        sid = _learn2reg_id(image)
        if sid in subjects:
            problems.add(f"duplicate id {sid!r}: {what} lists {image.name} again")
            return None
        parts = learn2reg_name_parts(image)
        extra = {"learn2reg": {"task": parts[0], "case": parts[1], "modality": parts[2]}} if parts else {}
        subjects[sid] = Subject(sid, image, _learn2reg_label(image, label), extra=extra)
        image_to_id[image.resolve()] = sid
        return sid

    if json_path is not None:
        doc = _load_json_strict(json_path, problems)
        if not isinstance(doc, dict):
            raise InputError(f"{json_path}: expected a JSON object, got {type(doc).__name__}")
        name = str(doc.get("name", name))
        labels_map = _parse_labels(doc.get("labels") or None, problems)
        training = doc.get("training", [])
        if not isinstance(training, list):
            problems.add(f"{json_path.name}: 'training' must be a list of {{image, label}}")
            training = []
        left_out = []
        for i, entry in enumerate(training):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                problems.add(f"{json_path.name}: training[{i}] has no 'image' path: {entry!r}")
                continue
            image = _as_path(entry["image"], root, f"training[{i}].image", problems)
            label = _as_path(entry.get("label"), root, f"training[{i}].label", problems)
            if image is None:
                continue
            if partial and not image.is_file():
                absent.add(image.resolve())
                left_out.append(_relative(image, root))
                continue
            add(image, label, f"{json_path.name} training[{i}]")
        if left_out:
            notes.append(f"{len(left_out)} training image(s) listed in {json_path.name} are not on disk and are left "
                         f"out: {', '.join(left_out[:10])}{' ...' if len(left_out) > 10 else ''}")
        not_shipped = []
        for i, entry in enumerate(doc.get("test", []) or []):
            image = _as_path(entry.get("image") if isinstance(entry, dict) else None, root, f"test[{i}].image",
                             problems)
            if image is None:
                continue
            if image.is_file():
                sid = add(image, None, f"{json_path.name} test[{i}]")
                if sid is not None:
                    listed_test.append(sid)
            else:
                absent.add(image.resolve())
                not_shipped.append(_relative(image, root))
        if not_shipped:
            notes.append(f"{len(not_shipped)} test image(s) listed in {json_path.name} are not on disk (skipped; "
                         f"registration_test pairs need them): {', '.join(not_shipped[:10])}"
                         f"{' ...' if len(not_shipped) > 10 else ''}")
        for set_name in LEARN2REG_SETS:
            raw_pairs = doc.get(set_name, []) or []
            if not isinstance(raw_pairs, list):
                problems.add(f"{json_path.name}: {set_name!r} must be a list of {{fixed, moving}}")
                continue
            dropped = 0
            for i, entry in enumerate(raw_pairs):
                if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("fixed", "moving")):
                    problems.add(f"{json_path.name}: {set_name}[{i}] must be {{fixed, moving}}: {entry!r}")
                    continue
                ids: list[str | None] = []
                for key in ("fixed", "moving"):
                    p = (root / entry[key]).resolve() if not Path(entry[key]).is_absolute() else Path(entry[key])
                    sid = image_to_id.get(p)
                    if sid is None and p not in absent:
                        listed = "training list" if set_name == "registration_val" else "training or test list"
                        problems.add(f"{json_path.name}: {set_name}[{i}].{key} = {entry[key]!r} is not an image "
                                     f"of the {listed}")
                    ids.append(sid)
                if None in ids:
                    dropped += 1
                    continue
                pairs.append(Pair(str(ids[0]), str(ids[1]), extra={"learn2reg": set_name}))
            if dropped:
                notes.append(f"{dropped} of the {len(raw_pairs)} {set_name} pair(s) are left out: a scan of theirs is "
                             f"not on disk")
    else:
        notes.append("no *_dataset.json found: subjects taken from imagesTr/, no registration pairs")
        for image in sorted((root / "imagesTr").glob("*.nii*")):
            if re.search(rf"{_NIFTI_RE}$", image.name):
                add(image, None, "imagesTr/")
    if not subjects:
        problems.add("no subjects found (expected a training list in *_dataset.json or images in imagesTr/)")
        problems.raise_if_any()

    val_ids = sorted({sid for p in pairs if p.extra.get("learn2reg") == "registration_val"
                      for sid in (p.fixed, p.moving)})
    in_pairs = {sid for p in pairs for sid in (p.fixed, p.moving)}
    template = val_ids[0] if val_ids else (sorted(in_pairs)[0] if in_pairs else sorted(subjects)[0])
    test = [sid for sid in sorted(in_pairs | set(listed_test)) if sid != template]
    training = [sid for sid in subjects if sid not in test and sid != template]
    roles = {sid: "template" if sid == template else "test" if sid in test else "train" for sid in subjects}
    subjects = {sid: replace(s, role=roles[sid]) for sid, s in subjects.items()}
    return Dataset(root=root, name=name, subjects=subjects, template=template, training=training, test=test,
                   pairs=pairs, labels=labels_map, layout="learn2reg",
                   description=f"Learn2Reg dataset {name}: scans of registration_val / registration_test are test "
                               f"scans, the others training scans; template {template} (Learn2Reg names none)",
                   notes=notes)


def _with_template(dataset: Dataset, template: str) -> Dataset:
    """The same dataset with another template subject (``"38"`` also finds ``btcv_0038``)."""
    candidates = [template]
    if template.isdigit():
        candidates.append(btcv_id(int(template)))
    chosen = next((c for c in candidates if c in dataset.subjects), None)
    if chosen is None:
        raise InputError(f"template: {template!r} is not a subject of {dataset.root}; subjects: "
                         f"{', '.join(sorted(dataset.subjects))}")
    if chosen == dataset.template:
        return dataset
    old = dataset.template
    subjects = dict(dataset.subjects)
    training = [s for s in dataset.training if s != chosen]
    test = [s for s in dataset.test if s != chosen]
    if old is not None and old in subjects:
        subjects[old] = replace(subjects[old], role="test")
        test.append(old)
    subjects[chosen] = replace(subjects[chosen], role="template")
    pairs = dataset.pairs
    if dataset.layout == "btcv":  # the BTCV pairs are test -> template: rebuild them for the new template
        pairs = [Pair(t, chosen) for t in test]
    return replace(dataset, subjects=subjects, template=chosen, training=training, test=test, pairs=pairs)


# ------------------------------------------------------------------------------------------------ validation
def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray] | str:
    """(shape, affine) of a NIfTI file from its header only, or a problem string."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for foreign or damaged files
        return f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})"
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, np.asarray(img.affine, dtype=np.float64)


def dataset_problems(dataset: Dataset, *, check_files: bool = True, check_grids: bool = True) -> list[str]:
    """Every problem of a dataset, as messages (empty list = valid). See :func:`validate_dataset`."""
    problems: list[str] = []
    ids = list(dataset.subjects)
    for sid, s in dataset.subjects.items():
        if sid != s.id:
            problems.append(f"subject key {sid!r} differs from its id {s.id!r}")
        if not _ID_RE.match(sid):
            problems.append(f"subject id {sid!r}: use letters, digits, '.', '_' or '-' only (it names files)")
        if s.role not in ROLES:
            problems.append(f"subject {sid}: role {s.role!r} is not one of {', '.join(ROLES)}")
    for key in ("training", "test"):
        lst = getattr(dataset, key)
        seen: set[str] = set()
        for sid in lst:
            if sid in seen:
                problems.append(f"{key}: duplicate id {sid!r}")
            seen.add(sid)
            if sid not in dataset.subjects:
                problems.append(f"{key}: unknown subject {sid!r}")
    both = sorted(set(dataset.training) & set(dataset.test))
    if both:
        problems.append(f"subjects in both training and test: {', '.join(both)}")
    if dataset.template is not None:
        if dataset.template not in dataset.subjects:
            problems.append(f"template: unknown subject {dataset.template!r}")
        elif dataset.template in dataset.training:
            problems.append(f"template {dataset.template!r} is also listed in training")
    for sid, s in dataset.subjects.items():
        expected = ("template" if sid == dataset.template else "train" if sid in dataset.training else
                    "test" if sid in dataset.test else None)
        if expected is not None and s.role != expected:
            problems.append(f"subject {sid}: role {s.role!r} but the lists make it {expected!r}")
        elif expected is None and s.role in ("template", "train", "test"):
            problems.append(f"subject {sid}: role {s.role!r} but it is not the template nor in the "
                            f"{'training' if s.role == 'train' else 'test'} list")
    seen_pairs: set[tuple[str, str]] = set()
    for i, p in enumerate(dataset.pairs):
        for key in ("fixed", "moving"):
            if getattr(p, key) not in dataset.subjects:
                problems.append(f"registration_pairs[{i}].{key}: unknown subject {getattr(p, key)!r}")
        if p.fixed == p.moving:
            problems.append(f"registration_pairs[{i}]: fixed and moving are the same subject {p.fixed!r}")
        if (p.fixed, p.moving) in seen_pairs:
            problems.append(f"registration_pairs[{i}]: duplicate pair {p.fixed} <- {p.moving}")
        seen_pairs.add((p.fixed, p.moving))
    used: dict[Path, str] = {}
    for sid, s in dataset.subjects.items():
        for what, p in (("image", s.image), ("labels", s.labels)):
            if p is None:
                continue
            full = dataset.path(p).resolve()
            if full in used:
                problems.append(f"subject {sid}: {what} {full} is also used by {used[full]} (duplicate)")
            used[full] = f"{sid} ({what})"
    if not check_files:
        return problems
    for sid in ids:
        s = dataset.subjects[sid]
        image = dataset.path(s.image)
        if not image.is_file():
            problems.append(f"missing file: {image} (image of {sid})")
            continue
        labels = dataset.path(s.labels) if s.labels is not None else None
        if labels is not None and not labels.is_file():
            problems.append(f"missing file: {labels} (labels of {sid})")
            labels = None
        for key, p in s.files.items():
            if not dataset.path(p).is_file():
                problems.append(f"missing file: {dataset.path(p)} ({key} of {sid})")
        if not check_grids:
            continue
        head = _header(image)
        if isinstance(head, str):
            problems.append(head)
            continue
        if len(head[0]) != 3:
            problems.append(f"{image}: expected a 3-D image, got shape {head[0]} ({sid})")
            continue
        if labels is not None:
            lab = _header(labels)
            if isinstance(lab, str):
                problems.append(lab)
            elif lab[0] != head[0] or not np.allclose(lab[1], head[1], atol=1e-2):
                problems.append(
                    f"grid mismatch for {sid}: labels {labels.name} have shape {lab[0]} and spacing "
                    f"{_spacing(lab[1])} mm, image {image.name} has shape {head[0]} and spacing "
                    f"{_spacing(head[1])} mm" + ("" if lab[0] != head[0] else " (affines differ by > 0.01 mm)"))
    for p in dataset.pairs:
        if p.ground_truth_field is not None and not dataset.path(p.ground_truth_field).is_file():
            problems.append(f"missing file: {dataset.path(p.ground_truth_field)} (ground-truth field of pair "
                            f"{p.fixed} <- {p.moving})")
    return problems


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]


def validate_dataset(dataset: Dataset, *, check_files: bool = True, check_grids: bool = True) -> None:
    """Raise one :class:`InputError` listing every problem: unknown or duplicate ids, inconsistent roles, missing
    files, image / label grids that differ (shape, or affine by more than 0.01 mm; read from headers only)."""
    problems = dataset_problems(dataset, check_files=check_files, check_grids=check_grids)
    if problems:
        raise InputError(_format_problems(f"dataset {dataset.root}", problems))


# ------------------------------------------------------------------------------------------------ writing
def _path_for_json(p: Path, dataset: Dataset, base: Path, absolute: bool) -> str:
    full = dataset.path(p).absolute()
    if not absolute:
        try:
            return full.relative_to(base.absolute()).as_posix()
        except ValueError:
            pass
    return str(full)


def dataset_to_json(dataset: Dataset, *, base: str | os.PathLike | None = None, absolute: bool = False
                    ) -> dict[str, Any]:
    """The dataset.json content: paths relative to ``base`` (default the dataset root) where they lie inside it,
    absolute otherwise (or always, with ``absolute=True``)."""
    base = Path(dataset.root if base is None else base)
    subjects = {}
    for sid, s in dataset.subjects.items():
        entry: dict[str, Any] = {"image": _path_for_json(s.image, dataset, base, absolute)}
        if s.labels is not None:
            entry["labels"] = _path_for_json(s.labels, dataset, base, absolute)
        entry["role"] = s.role
        if s.tags:
            entry["tags"] = list(s.tags)
        for key, p in s.files.items():
            entry[key] = _path_for_json(p, dataset, base, absolute)
        entry.update(s.extra)
        subjects[sid] = entry
    pairs = []
    for p in dataset.pairs:
        entry = {"fixed": p.fixed, "moving": p.moving}
        if p.ground_truth_field is not None:
            entry["ground_truth_field"] = _path_for_json(p.ground_truth_field, dataset, base, absolute)
        entry.update(p.extra)
        pairs.append(entry)
    doc = {
        "name": dataset.name, "description": dataset.description, "format": DATASET_FORMAT,
        "labels": label_names_json(dataset.labels), "template": dataset.template, "subjects": subjects,
        "training": list(dataset.training), "test": list(dataset.test), "registration_pairs": pairs,
    }
    if dataset.layout != "slicreg":
        doc["source_layout"] = dataset.layout
    for k, v in dataset.extra.items():
        doc.setdefault(k, v)
    return doc


def write_dataset_json(dataset: Dataset, folder: str | os.PathLike | None = None, *, absolute: bool = False,
                       check: bool = True) -> Path:
    """Write ``<folder>/dataset.json`` (default folder: the dataset root) atomically.

    Args:
        dataset: what to write.
        folder: where; paths inside it are written relative to it, other paths absolute.
        absolute: write every path absolute (e.g. a dataset.json that points at a user's data elsewhere).
        check: validate first (ids, lists, roles; files are not required to exist yet).

    Returns:
        The path of the written file.
    """
    if check:
        problems = dataset_problems(dataset, check_files=False)
        if problems:
            raise InputError(_format_problems(f"write_dataset_json({dataset.name!r})", problems))
    folder = Path(dataset.root if folder is None else folder)
    return atomic_write_json(folder / DATASET_JSON, dataset_to_json(dataset, base=folder, absolute=absolute))


def subjects_with_role(dataset: Dataset, roles: Iterable[str]) -> list[str]:
    """Ids of the subjects whose role is in ``roles``, in dataset order."""
    roles = set(roles)
    return [sid for sid, s in dataset.subjects.items() if s.role in roles]
