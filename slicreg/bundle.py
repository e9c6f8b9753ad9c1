"""Weights bundles: trained network + the template supervoxels it predicts + a model card; and prediction.

A bundle is a folder::

    model.pt              state_dict of the network of the bundle's kind (torch.save; loaded with weights_only=True)
    supervoxels.nii.gz    the template supervoxels the logits index: uint8 (X, Y, Z, 16) on disk = (16, X, Y, Z)
    model_card.json       architecture (incl. the logit layout), training data provenance, full training config,
                          iterations, wall time, hardware, validation metrics, template sha256, sha256 of the files
    MODEL_CARD.md         the same for people
    curves.png            training / validation curves (optional)
    SHA256SUMS            sha256 of every other file (``sha256sum -c SHA256SUMS`` format), written last

:func:`load_bundle` checks the format, the architecture against :func:`slicreg.network.architecture_spec`, every
file's sha256, the state_dict keys and shapes and the supervoxels' shape and values, and raises one
:class:`~slicreg.errors.InputError` naming the bundle and the problem.

:func:`predict` runs the network in eval mode (bf16 autocast on CPU, fp16 on CUDA unless ``dtype=torch.float32``).

**Kinds.** The card's ``"kind"`` (:class:`BundleKind`) says which network ``model.pt`` holds and what it predicts:
``{"model": "deeplab" | "unet", "target": "supervoxels" | "displacement"}`` -- SLIC-Reg's DeepLab
(``deeplab/supervoxels``), the paper's Slic-UNet baseline (``unet/supervoxels``, :mod:`slicreg.unet`) or its
Regression baseline (``deeplab/displacement``, :mod:`slicreg.regression`). A card without ``"kind"`` is
``deeplab/supervoxels`` (every bundle made before kinds, e.g. the shipped ones). The format is the same for all
kinds (a displacement bundle carries its template's supervoxels too: they fix the preprocessed grid and identify the
template for atlas mode); the architecture is checked against the kind's
(:func:`slicreg.network.architecture_spec`), and :func:`load_bundle` builds the kind's network
(:func:`slicreg.network.build_model`). What needs supervoxel maps refuses a displacement bundle in one line
(:func:`require_target`); registration runs a displacement bundle's regression instead
(:func:`slicreg.registration.register_preprocessed`, atlas mode only).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slicreg.conventions import Volume
from slicreg.errors import InputError
from slicreg.network import (
    HU_SCALE,
    LOGIT_LAYOUT,
    N_CLASSES,
    N_LAYERS,
    SlicRegNet,
    _check_kind,
    architecture_spec,
    build_model,
    count_parameters,
)

__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleKind", "save_bundle", "load_bundle", "verify_bundle", "predict",
           "upsample_logits_x2", "upsampled_argmax_x2", "model_card_markdown", "atlas_template_problem",
           "bundle_kind", "model_kind", "require_target", "displacement_atlas_problem"]

BUNDLE_FORMAT = "slicreg-bundle/1"
MODEL_FILE = "model.pt"
SUPERVOXELS_FILE = "supervoxels.nii.gz"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
CURVES_FILE = "curves.png"
SUMS_FILE = "SHA256SUMS"

DEFAULT_BUNDLE = "slicreg-cohort-v3"
"""The shipped weights: ``weights/<DEFAULT_BUNDLE>`` of the repository; a wheel carries them as package data
``slicreg/weights/<DEFAULT_BUNDLE>`` (setup.py's build step reads this line; MANIFEST.in names the folder too)."""


def default_bundle_path() -> Path:
    """Where the shipped weights are: in the installed package (``slicreg/weights/<DEFAULT_BUNDLE>``, from a wheel),
    else in the clone this package runs from (``weights/<DEFAULT_BUNDLE>``, an editable install or the source
    tree). When neither exists, the package location is returned (and loading it says what is missing)."""
    here = Path(__file__).resolve().parent
    candidates = [here / "weights" / DEFAULT_BUNDLE, here.parent / "weights" / DEFAULT_BUNDLE]
    for folder in candidates:
        if (folder / CARD_JSON).is_file():
            return folder
    return candidates[0]


INTENDED_USE = (
    "Research use: registering abdominal CT scans of different patients (and atlas-to-patient) by predicted "
    "template supervoxels, on CPU or GPU, as `slicreg register` and `slicreg predict` do; trying the method and "
    "starting a fine-tuning on one's own cohort (`slicreg train --init-weights`). Not a medical device and not for "
    "clinical decisions.")
LIMITATIONS = [
    "The network predicts supervoxels well only on scans like its training data (listed under Training data): "
    "other scanners, contrast phases, body regions, anatomy, pathology or fields of view may give wrong "
    "supervoxels and so a wrong field, without any error. Check every result on your own scans (`slicreg "
    "evaluate` with labels, or an overlay of the warped image).",
    "Inputs are CT in Hounsfield units; they are preprocessed the paper's way (RAS, 2 mm, 192 x 160 x 256 "
    "around the soft-tissue centre) before the network sees them; anatomy outside that box is not registered by "
    "the network.",
]
COHORT_LIMITATION = (
    "Trained on a synthetic cohort made from ONE patient's CT (`slicreg cohort`): every training scan is that "
    "patient under random affine and smooth deformations, organ size changes, contrast phases, noise and fields of "
    "view. The network has never seen another person's anatomy, so on your own scans expect clearly worse "
    "supervoxels and fields than the demo's scores, which measure how well synthetic deformations of that one "
    "patient are undone (not comparable with BTCV or Learn2Reg results). For real use train or fine-tune on a "
    "cohort of your own (docs/own_data.md).")


def portable_paths(value: Any, bases: list[Path] | None = None) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every absolute path replaced by a path relative to the
    working folder or the repository it is under (``runs/demo/prep/<key>``, ``weights/slicreg-cohort-v2``), or else
    by its name, so a model card names no machine's folders."""
    if bases is None:
        bases = [Path.cwd().resolve(), Path(__file__).resolve().parents[1]]
    if isinstance(value, dict):
        return {k: portable_paths(v, bases) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v, bases) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        path = Path(value)
        for base in bases:
            try:
                return path.relative_to(base).as_posix()
            except ValueError:
                continue
        return path.name
    return value


TARGET_NOUNS = {"supervoxels": "supervoxel", "displacement": "displacement-regression"}
"""How messages call a bundle of each target."""


@dataclass(frozen=True)
class BundleKind:
    """What a bundle's network is and predicts: ``model`` (:data:`slicreg.network.MODELS`: ``"deeplab"``,
    ``"unet"``) and ``target`` (:data:`slicreg.network.TARGETS`: ``"supervoxels"``, ``"displacement"``); the
    default, ``deeplab/supervoxels``, is SLIC-Reg's and that of every card without a ``"kind"``."""

    model: str = "deeplab"
    target: str = "supervoxels"

    def __str__(self) -> str:
        return f"{self.model}/{self.target}"

    @property
    def noun(self) -> str:
        """``"supervoxel"`` or ``"displacement-regression"`` (as in "a supervoxel bundle")."""
        return TARGET_NOUNS[self.target]

    def as_dict(self) -> dict[str, str]:
        """The card's ``"kind"`` entry."""
        return {"model": self.model, "target": self.target}

    @classmethod
    def parse(cls, value: Any, where: str) -> BundleKind:
        """A kind from a :class:`BundleKind`, a mapping ``{"model", "target"}`` (a card's entry), a ``(model,
        target)`` pair or ``"model/target"``; ``None`` is the default kind.

        Raises:
            InputError: another type, missing or unknown entries, or a combination
                :func:`slicreg.network.build_model` cannot build (``unet/displacement``); ``where`` names the source.
        """
        if value is None:
            return cls()
        if isinstance(value, BundleKind):
            kind = value
        elif isinstance(value, Mapping) and set(value) <= {"model", "target"}:
            kind = cls(**{k: v for k, v in value.items()})
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            kind = cls(*value)
        elif isinstance(value, str) and value.count("/") == 1:
            kind = cls(*value.split("/"))
        else:
            raise InputError(f"{where}: expected a kind {{'model': ..., 'target': ...}} (or 'model/target'), got "
                             f"{value!r:.80}")
        if not isinstance(kind.model, str) or not isinstance(kind.target, str):
            raise InputError(f"{where}: kind entries must be strings, got {kind.as_dict()!r:.80}")
        _check_kind(kind.model, kind.target, where)
        return kind


def bundle_kind(card: dict[str, Any], where: Any = CARD_JSON) -> BundleKind:
    """The kind a model card records (``deeplab/supervoxels`` without a ``"kind"`` entry); ``where`` names the card
    in errors (:meth:`BundleKind.parse`)."""
    return BundleKind.parse(card.get("kind"), f"{where}: entry 'kind'")


def model_kind(model: Any) -> BundleKind:
    """The kind of a network (or of a :class:`Bundle`: its recorded kind): :class:`slicreg.unet.SlicUNet` ->
    ``unet/supervoxels``, :class:`slicreg.regression.RegressionNet` -> ``deeplab/displacement``, anything else
    ``deeplab/supervoxels``."""
    if isinstance(model, Bundle):
        return model.kind
    from slicreg.unet import SlicUNet

    if isinstance(model, SlicUNet):
        return BundleKind("unet", "supervoxels")
    from slicreg.regression import RegressionNet

    if isinstance(model, RegressionNet):
        return BundleKind("deeplab", "displacement")
    return BundleKind()


def require_target(model_or_bundle: Any, target: str = "supervoxels", *, what: str,
                   error: type[InputError] = InputError) -> None:
    """Refuse a bundle (or a network) of another target, in one line: ``"<bundle>: a displacement-regression bundle
    (kind deeplab/displacement); <what> needs a supervoxel bundle"``.

    Args:
        model_or_bundle: a :class:`Bundle` or a network (:func:`model_kind`).
        target: the target needed (``"supervoxels"``: everything that uses supervoxel maps).
        what: what needs it, e.g. ``"`slicreg predict`"``.
        error: the exception type (a stage raises :class:`slicreg.errors.ConfigError`).
    """
    kind = model_kind(model_or_bundle)
    if kind.target != target:
        name = getattr(model_or_bundle, "path", None) or f"a {type(model_or_bundle).__name__} network"
        raise error(f"{name}: a {kind.noun} bundle (kind {kind}); {what} needs a {TARGET_NOUNS[target]} bundle")


def displacement_atlas_problem(bundle: Bundle) -> str:
    """Why a displacement bundle cannot register a pair of two scans (the caller adds how to switch to atlas mode)."""
    return (f"{bundle.path}: a {bundle.kind.noun} bundle (kind {bundle.kind}) registers a scan to the bundle's own "
            f"template only (its network regresses the field scan -> template; a pair of two scans would need the "
            f"inverse of such a field, which slicreg does not compute)")


@dataclass
class Bundle:
    """A loaded bundle: ``model`` (eval mode), ``card``, and ``template_supervoxels`` ((16, X, Y, Z) uint8 volume),
    read and checked on first use (atlas mode only: the 16 layers are ~0.2 s to decompress);
    :attr:`template_shape` is the file header's ``(X, Y, Z)``; ``kind`` what the network is and predicts
    (:class:`BundleKind`, from the card)."""

    path: Path
    model: torch.nn.Module  # the kind's network: SlicRegNet, SlicUNet or RegressionNet
    card: dict[str, Any]
    _supervoxels: Volume | None = None
    kind: BundleKind = field(default_factory=BundleKind)

    @property
    def template_supervoxels(self) -> Volume:
        if self._supervoxels is None:
            from slicreg.io import load_volume

            where = self.path / SUPERVOXELS_FILE
            sv = load_volume(where, kind="labels", channels=True)
            _check_supervoxels(sv.array, where)
            self._supervoxels = Volume(sv.array.astype(np.uint8, copy=False), sv.affine, sv.meta)
        return self._supervoxels

    @property
    def template_shape(self) -> tuple[int, ...]:
        """The template supervoxel grid ``(X, Y, Z)`` (4 mm), from the file header without reading the layers."""
        if self._supervoxels is not None:
            return tuple(int(s) for s in self._supervoxels.array.shape[1:])
        import nibabel as nib

        return tuple(int(s) for s in nib.load(str(self.path / SUPERVOXELS_FILE)).shape[:3])


# --------------------------------------------------------------------------------------------------- save


def save_bundle(directory: str | os.PathLike, model: SlicRegNet, *, template_supervoxels: str | os.PathLike,
                training: dict[str, Any], data_provenance: dict[str, Any],
                curves_png: str | os.PathLike | None = None, intended_use: str | None = None,
                limitations: list[str] | None = None, kind: BundleKind | Mapping[str, str] | str | None = None
                ) -> Path:
    """Write a bundle folder (see the module docstring); every file is written atomically, SHA256SUMS last.

    Args:
        directory: the bundle folder (created; files of an older bundle there are replaced).
        model: the trained network (its state_dict is saved in float32, on the CPU).
        template_supervoxels: the template's ``supervoxels.nii.gz`` (copied byte for byte); a sidecar
            ``supervoxels.json`` beside it, if present, is summarised in the card.
        training: facts about the run (config, iterations, wall_s, hardware, validation, ...).
        data_provenance: facts about the training data (dataset name, cohort seed and generator, template ...).
        curves_png: optional curves figure to include.
        intended_use, limitations: the card's statements (default :data:`INTENDED_USE` and :data:`LIMITATIONS`,
            plus :data:`COHORT_LIMITATION` when the data provenance names a slicreg cohort).
        kind: the network's kind (:class:`BundleKind`, ``{"model", "target"}`` or ``"model/target"``), recorded in
            the card with the kind's architecture; default: the model's own (:func:`model_kind`:
            ``deeplab/supervoxels`` for :class:`~slicreg.network.SlicRegNet`). The model's state_dict must fit the
            kind's network.

    Absolute paths in ``training``, ``data_provenance`` and the supervoxels' sidecar are written relative to the
    working folder or the repository, or as names (:func:`portable_paths`).
    """
    from slicreg.io import (
        atomic_path,
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_text,
        load_volume,
        read_json,
        sha256_file,
    )

    kind = model_kind(model) if kind is None else BundleKind.parse(kind, "save_bundle: kind")
    problem = _state_problem(model.state_dict(), kind)
    if problem:
        raise InputError(f"save_bundle: the model is not a {kind} network ({problem})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sv_src = Path(template_supervoxels)
    sv = load_volume(sv_src, kind="labels", channels=True)
    _check_supervoxels(sv.array, sv_src)

    state = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_path(directory / MODEL_FILE) as tmp:
        torch.save(state, tmp)
    atomic_write_bytes(directory / SUPERVOXELS_FILE, sv_src.read_bytes())
    files = [MODEL_FILE, SUPERVOXELS_FILE]
    if curves_png is not None and Path(curves_png).is_file():
        atomic_write_bytes(directory / CURVES_FILE, Path(curves_png).read_bytes())
        files.append(CURVES_FILE)
    elif (directory / CURVES_FILE).exists():
        (directory / CURVES_FILE).unlink()

    sidecar = sv_src.with_name("supervoxels.json")
    template: dict[str, Any] = {
        "supervoxels_shape": list(sv.array.shape),
        "supervoxels_affine": np.round(sv.affine, 6).tolist(),
        "supervoxels_sha256": sha256_file(directory / SUPERVOXELS_FILE),
    }
    if sidecar.is_file():
        meta = read_json(sidecar)
        template["supervoxels_json"] = {k: meta[k] for k in ("format", "template", "mask", "parameters",
                                                              "library_versions") if k in meta}
        found = meta.get("template", {}).get("sha256") if isinstance(meta.get("template"), dict) else None
        for key in ("template_sha256", "template_image_sha256", "image_sha256"):
            found = found or (meta.get(key) if isinstance(meta.get(key), str) else None)
        if isinstance(found, str):
            template["image_sha256"] = found
    if "image_sha256" not in template and isinstance(data_provenance.get("template_image_sha256"), str):
        template["image_sha256"] = data_provenance["template_image_sha256"]

    from slicreg import __version__

    if limitations is None:
        limitations = [*LIMITATIONS, *([COHORT_LIMITATION] if "cohort" in data_provenance else [])]
    architecture = architecture_spec(kind.model, kind.target)
    card = {
        "format": BUNDLE_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "slicreg_version": __version__,
        "intended_use": INTENDED_USE if intended_use is None else intended_use,
        "limitations": list(limitations),
        "kind": kind.as_dict(),
        "architecture": architecture,
        "parameters": count_parameters(model),
        **({"logit_layout": LOGIT_LAYOUT} if kind.target == "supervoxels" else {}),
        "input": {"spacing_mm": 4.0, "normalisation": f"HU / {HU_SCALE:g}, no clipping",
                  "from_preprocessed_2mm": "2x2x2 average pooling (192 x 160 x 256 -> 96 x 80 x 128)"},
        "output": ({"layers": N_LAYERS, "classes": N_CLASSES, "stride": 2,
                    "voxel_centres": "output voxel q is centred on input voxel 2q"} if kind.target == "supervoxels"
                   else {"components": 3, "stride": 2, **architecture.get("output", {})}),
        "template": portable_paths(template),
        "training_data": portable_paths(data_provenance),
        "training": portable_paths(training),
        "files": {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
                  for name in files},
    }
    atomic_write_json(directory / CARD_JSON, card)
    atomic_write_text(directory / CARD_MD, model_card_markdown(card))
    sums = [f"{sha256_file(directory / name)}  {name}" for name in [*files, CARD_JSON, CARD_MD]]
    atomic_write_text(directory / SUMS_FILE, "\n".join(sums) + "\n")
    return directory


def _check_supervoxels(array: np.ndarray, where: Any) -> None:
    if array.ndim != 4 or array.shape[0] != N_LAYERS:
        raise InputError(f"{where}: expected template supervoxels (16, X, Y, Z) (stored X, Y, Z, 16), got "
                         f"shape {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= N_CLASSES):
        raise InputError(f"{where}: supervoxel labels must be in 0..{N_CLASSES - 1}, got "
                         f"{int(array.min())}..{int(array.max())}")


# --------------------------------------------------------------------------------------------------- load


def verify_bundle(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a bundle's files and hashes and its card's format and architecture; return the card.

    Raises:
        InputError: a missing or extra-corrupt file, a sha256 mismatch, another format or architecture."""
    from slicreg.io import sha256_file

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a weights bundle folder (expected {MODEL_FILE}, {SUPERVOXELS_FILE}, "
                         f"{CARD_JSON})")
    for name in (MODEL_FILE, SUPERVOXELS_FILE, CARD_JSON):
        if not (directory / name).is_file():
            raise InputError(f"{directory}: incomplete weights bundle, {name} is missing")
    sums_path = directory / SUMS_FILE
    if sums_path.is_file():
        for line in sums_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            digest, _, name = line.partition("  ")
            p = directory / name.strip()
            if not p.is_file():
                raise InputError(f"{directory}: {name.strip()} is listed in {SUMS_FILE} but missing")
            if sha256_file(p) != digest.strip():
                raise InputError(f"{p}: sha256 does not match {SUMS_FILE} (the file is corrupted or was changed)")
    try:
        card = json.loads((directory / CARD_JSON).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{directory / CARD_JSON}: not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise InputError(f"{directory / CARD_JSON}: format {got!r}, expected {BUNDLE_FORMAT!r}")
    _check_card_types(card, directory / CARD_JSON)
    for name, entry in card.get("files", {}).items():
        p = directory / name
        if not p.is_file():
            raise InputError(f"{directory}: {name} is listed in the model card but missing")
        if sha256_file(p) != entry.get("sha256"):
            raise InputError(f"{p}: sha256 does not match the model card (the file is corrupted or was changed)")
    kind = bundle_kind(card, directory / CARD_JSON)
    want = architecture_spec(kind.model, kind.target)
    got = card.get("architecture")
    if got != want:
        keys = sorted(k for k in set(want) | set(got or {}) if (got or {}).get(k) != want.get(k))
        raise InputError(f"{directory / CARD_JSON}: the bundle's architecture differs from this slicreg's {kind} "
                         f"network in {keys} (bundle: {[(got or {}).get(k) for k in keys]}, code: "
                         f"{[want.get(k) for k in keys]})")
    if kind.target == "supervoxels" and card.get("logit_layout") != LOGIT_LAYOUT:
        raise InputError(f"{directory / CARD_JSON}: logit layout {card.get('logit_layout')!r} differs from the "
                         f"network's {LOGIT_LAYOUT!r}")
    return card


CARD_TYPES: dict[str, type] = {
    "created": str, "kind": dict, "architecture": dict, "parameters": dict, "logit_layout": str, "input": dict,
    "output": dict, "template": dict, "training_data": dict, "training": dict, "files": dict,
    "slicreg_version": str, "intended_use": str, "limitations": list,
}
"""Top-level entries of ``model_card.json`` and their JSON types (an entry may be absent)."""
CARD_TEMPLATE_TYPES: dict[str, tuple[type, ...]] = {
    "supervoxels_shape": (list,), "supervoxels_affine": (list,), "supervoxels_sha256": (str,),
    "image_sha256": (str, type(None)), "supervoxels_json": (dict, str, type(None)),
}


def _check_card_types(card: dict[str, Any], where: Path) -> None:
    """One :class:`InputError` for a card entry of the wrong JSON type (an edited or foreign card)."""
    def kind(v: Any) -> str:
        return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(v), type(v).__name__)

    for key, want in CARD_TYPES.items():
        if key in card and not isinstance(card[key], want):
            raise InputError(f"{where}: entry {key!r} must be {kind(want())}, got {kind(card[key])} "
                             f"({card[key]!r:.60})")
    for key, wants in CARD_TEMPLATE_TYPES.items():
        value = card.get("template", {}).get(key)
        if key in card.get("template", {}) and not isinstance(value, wants):
            raise InputError(f"{where}: entry template.{key} must be {' or '.join(kind(w()) for w in wants)}, got "
                             f"{kind(value)} ({value!r:.60})")
    for name, entry in card.get("files", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise InputError(f"{where}: entry files.{name} must be an object with a 'sha256' string, got {entry!r:.60}")


def _state_problem(state: dict[str, Any], kind: BundleKind, want: dict[str, Any] | None = None) -> str | None:
    """What keeps ``state`` from being a state_dict of the ``kind``'s network (``want``: that network's state_dict,
    built here if not given): missing or unexpected keys, other shapes; or ``None``."""
    if want is None:
        want = build_model(seed=0, backward="native", model=kind.model, target=kind.target).state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        parts.append("shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}"
                                                    for k in wrong[:5]))
    return "; ".join(parts) or None


def load_weights(directory: str | os.PathLike, *, verify: bool = True,
                 kind: BundleKind | Mapping[str, str] | str | None = None) -> dict[str, torch.Tensor]:
    """The verified network weights of a bundle (a state_dict of its kind's network, float32 on the CPU).

    Checks the bundle (:func:`verify_bundle`), that every key and shape fits the network of the card's kind
    (:func:`bundle_kind`) and that all values are finite; raises one :class:`InputError` naming the file otherwise.
    Used by :func:`load_bundle` and to start a training run from a bundle (``TrainConfig.init_weights``).

    ``kind``: the kind the caller needs (e.g. the network it will load the weights into); a bundle of another kind
    is refused in one line. With ``verify=False`` a given ``kind`` is taken as the bundle's (the card is not read)."""
    directory = Path(directory)
    needed = None if kind is None else BundleKind.parse(kind, "load_weights: kind")
    if verify:
        own = bundle_kind(verify_bundle(directory), directory / CARD_JSON)
    elif needed is not None:
        own = needed
    else:
        try:
            own = bundle_kind(json.loads((directory / CARD_JSON).read_text(encoding="utf-8")), directory / CARD_JSON)
        except (OSError, ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise InputError(f"{directory / CARD_JSON}: not a readable model card ({exc})") from None
    if needed is not None and needed != own:
        raise InputError(f"{directory}: a {own.noun} bundle (kind {own}); a {needed} network needs a {needed} "
                         f"bundle")
    return _read_state(directory, own)


def _read_state(directory: Path, kind: BundleKind, reference: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``model.pt`` of a bundle, checked against the ``kind``'s network (``reference``: its state_dict, if built
    already) and for finite values."""
    try:
        state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{directory / MODEL_FILE}: not a readable state_dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise InputError(f"{directory / MODEL_FILE}: expected a state_dict, got {type(state).__name__}")
    problem = _state_problem(state, kind, reference)
    if problem:
        raise InputError(f"{directory / MODEL_FILE}: weights do not fit the {kind} network: {problem}")
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    bad = []
    if floats and not bool(torch.isfinite(torch.cat([v.reshape(-1).float() for v in floats.values()])).all()):
        bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]  # one pass, names only if needed
    if bad:
        raise InputError(f"{directory / MODEL_FILE}: non-finite values in {bad[:5]}")
    return state


def load_bundle(directory: str | os.PathLike, *, device: Any = "cpu", channels_last: bool | None = None) -> Bundle:
    """Load and verify a bundle (see :func:`verify_bundle`); the model is returned in eval mode on ``device``.

    The network is the one of the card's kind (:func:`bundle_kind`, built by :func:`slicreg.network.build_model`);
    ``Bundle.kind`` says which. ``channels_last`` (default: on for the CPU) converts the model to channels-last 3-D
    memory format."""
    directory = Path(directory)
    card = verify_bundle(directory)
    kind = bundle_kind(card, directory / CARD_JSON)
    # built without storage ("meta") and given the file's tensors (assign): no initialisation and no copy to
    # overwrite, ~0.08 s of a command's start-up; the same network, output for output (test)
    model = build_model(seed=0, backward="native", model=kind.model, target=kind.target, device="meta")
    model.load_state_dict(_read_state(directory, kind, model.state_dict()), assign=True)
    dev = torch.device(device)
    model = model.to(dev).eval()
    if channels_last if channels_last is not None else dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)
    return Bundle(directory, model, card, kind=kind)


def atlas_template_problem(bundle: Bundle, *, template_sha256: str, supervoxels: np.ndarray | None = None,
                           supervoxels_template_sha256: str | None = None) -> str | None:
    """Why atlas mode would be wrong for a template scan; ``None`` when it is valid.

    Atlas mode registers a scan to the template without a network pass for the template: the template side is
    the template's own supervoxels. That is right only for the template the bundle was trained on: the network
    predicts the labels of the bundle's supervoxels, so a flow between a scan's predicted maps and another
    template's supervoxels follows labels that mean different places, and gives a wrong field without any error.
    Atlas mode is valid when

    1. the template image is the image the bundle's supervoxels were made on (``template_sha256`` equals the
       card's ``template.image_sha256``), or
    2. template supervoxels are passed explicitly, the bundle was trained on them (their labels equal the
       bundle's, voxel for voxel) and they were made on this template image (``supervoxels_template_sha256``,
       from their sidecar ``supervoxels.json``, equals ``template_sha256``).

    Args:
        bundle: the loaded bundle.
        template_sha256: sha256 of the template image file (the preprocessed scan registration uses).
        supervoxels: template supervoxels passed explicitly ``(16, X, Y, Z)``, or ``None``.
        supervoxels_template_sha256: sha256 of the image those supervoxels were made on, or ``None`` (unknown).

    Returns:
        ``None``, or one sentence saying what does not match (the caller adds what to do instead).
    """
    recorded = bundle.card.get("template", {}).get("image_sha256")
    if recorded is not None and recorded == template_sha256:
        return None
    if supervoxels is not None:
        own = np.asarray(bundle.template_supervoxels.array)
        given = np.asarray(supervoxels)
        if given.shape != own.shape or not np.array_equal(given, own):
            return ("the template supervoxels given are not the ones the bundle was trained on (they differ from "
                    f"the bundle's {SUPERVOXELS_FILE})")
        if supervoxels_template_sha256 is None:
            return ("the template supervoxels given do not record the image they were made on (no template sha256 "
                    "in their supervoxels.json)")
        if supervoxels_template_sha256 != template_sha256:
            return (f"the template supervoxels given were made on another image (sha256 "
                    f"{supervoxels_template_sha256[:12]}...) than this template (sha256 {template_sha256[:12]}...)")
        return None
    if recorded is None:
        return ("the bundle does not record the image its template supervoxels were made on, so this template "
                "cannot be shown to be it (pass the template supervoxels it was trained on)")
    return (f"the template image (sha256 {template_sha256[:12]}...) is not the image the bundle's template "
            f"supervoxels were made on (sha256 {recorded[:12]}...)")


# ------------------------------------------------------------------------------------------------ predict


def upsample_logits_x2(z: torch.Tensor) -> torch.Tensor:
    """Linear x2 upsampling of ``(..., X', Y', Z')`` to ``(..., 2X', 2Y', 2Z')`` for output voxels centred on even input
    voxels: ``out[2q] = z[q]``, ``out[2q + 1] = (z[q] + z[q + 1]) / 2`` (the last voxel repeats ``z[X' - 1]``)."""
    for axis in (-3, -2, -1):
        nxt = torch.cat([z.narrow(axis, 1, z.shape[axis] - 1), z.narrow(axis, z.shape[axis] - 1, 1)], axis)
        z = torch.stack([z, (z + nxt) * 0.5], dim=axis).flatten(z.dim() + axis, z.dim() + axis + 1)
    return z


def _next_along(a: torch.Tensor, axis: int) -> torch.Tensor:
    """``a[q + 1]`` along ``axis`` with the last element repeated."""
    n = a.shape[axis]
    return torch.cat([a.narrow(axis, 1, n - 1), a.narrow(axis, n - 1, 1)], axis)


def upsampled_argmax_x2(z: torch.Tensor) -> torch.Tensor:
    """``upsample_logits_x2(z).argmax(0)`` for ``z`` ``(C, X', Y', Z')`` without the full-size upsampled logits.

    An input voxel of parity ``(px, py, pz)`` holds the mean of the 1, 2, 4 or 8 output voxels around it, and the
    argmax of a mean is the argmax of the sum; so each of the 8 parity classes is one argmax of sums at the output
    resolution (7 additions of ``z``-sized tensors in all). Returns int64 ``(2X', 2Y', 2Z')``."""
    parts = [((), z.permute(1, 2, 3, 0).contiguous())]  # classes last: contiguous argmax
    for axis in (0, 1, 2):
        parts = [(key + (p,), a if p == 0 else a + _next_along(a, axis)) for key, a in parts for p in (0, 1)]
    out = torch.empty(tuple(2 * s for s in z.shape[1:]), dtype=torch.int64, device=z.device)
    for (px, py, pz), a in parts:
        out[px::2, py::2, pz::2] = a.argmax(-1)
    return out


def network_pass_input(model: SlicRegNet, image_hu_4mm: np.ndarray, *, device: Any, dtype: Any
                       ) -> tuple[SlicRegNet, torch.Tensor, Any, bool]:
    """What an inference pass needs, from a checked 4 mm image in HU: the model on ``device`` in eval mode, the
    input ``(1, 1, X, Y, Z)`` (HU / HU_SCALE; channels-last when the model's weights are), the compute dtype
    (``None`` -> bf16 on CPU, fp16 on CUDA) and whether the model is channels-last."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    channels_last = any(p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)
                        and not p.is_contiguous() for p in model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image_hu_4mm, dtype=np.float32) / np.float32(HU_SCALE))[None, None]
    x = x.to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
    return model, x, dtype, channels_last


@torch.no_grad()
def predict(model_or_bundle: SlicRegNet | Bundle, image_hu_4mm: Any, *, output: str = "labels",
            grid: str = "input", device: Any = "cpu", dtype: torch.dtype | None = None) -> Any:
    """Predict supervoxels for one scan.

    Args:
        model_or_bundle: a :class:`Bundle` or a :class:`~slicreg.network.SlicRegNet` (put in eval mode here).
        image_hu_4mm: ``(X, Y, Z)`` image in HU on the 4 mm grid (numpy or torch; see
            :func:`slicreg.network.network_input` to make it from the preprocessed 2 mm image), X, Y, Z divisible
            by 4.
        output: ``"labels"`` (argmax), ``"probs"`` (softmax over the 128 classes of each layer) or ``"logits"``.
        grid: ``"input"`` (labels only: logits upsampled x2 linearly per layer, then argmax, on the 4 mm input grid)
            or ``"output"`` (the network's stride-2 grid).
        device: where the network runs (the model is moved there).
        dtype: compute precision; ``None`` = bf16 autocast on CPU, fp16 autocast on CUDA; ``torch.float32`` = full
            precision.

    Returns:
        numpy: labels uint8 ``(16, X, Y, Z)`` (``grid="input"``) or ``(16, X/2, Y/2, Z/2)``; probs / logits float32
        ``(16, 128, X/2, Y/2, Z/2)``.
    """
    require_target(model_or_bundle, what="supervoxel prediction (slicreg.bundle.predict)")
    model = model_or_bundle.model if isinstance(model_or_bundle, Bundle) else model_or_bundle
    if output not in ("labels", "probs", "logits"):
        raise InputError(f"predict: output must be 'labels', 'probs' or 'logits', got {output!r}")
    if grid not in ("input", "output"):
        raise InputError(f"predict: grid must be 'input' or 'output', got {grid!r}")
    if grid == "input" and output != "labels":
        raise InputError("predict: probs / logits are returned on the stride-2 output grid (grid='output'); "
                         "on the input grid they would need 16 x 128 full-size volumes")
    img = image_hu_4mm.detach().cpu().numpy() if isinstance(image_hu_4mm, torch.Tensor) else np.asarray(image_hu_4mm)
    if img.ndim != 3:
        raise InputError(f"predict: expected a 3-D image (X, Y, Z), got shape {img.shape}")
    if any(s % 4 for s in img.shape):
        raise InputError(f"predict: image sizes must be divisible by 4 (4 mm grid, e.g. 96 x 80 x 128), "
                         f"got {img.shape}")
    if not np.all(np.isfinite(img)):
        raise InputError("predict: the image contains NaN or Inf values")
    model, x, dtype, _ = network_pass_input(model, img, device=device, dtype=dtype)
    if dtype == torch.float32:
        logits = model(x)
    else:
        with torch.autocast(x.device.type, dtype=dtype):
            logits = model(x)
    z = logits[0].reshape(N_LAYERS, N_CLASSES, *logits.shape[2:])  # layout: channel 128 * layer + class
    if output == "logits":
        return z.float().cpu().numpy()
    if output == "probs":
        return torch.softmax(z.float(), dim=1).cpu().numpy()
    if grid == "output":
        return z.argmax(1).to(torch.uint8).cpu().numpy()
    out = np.empty((N_LAYERS, *img.shape), dtype=np.uint8)
    for layer in range(N_LAYERS):
        out[layer] = upsampled_argmax_x2(z[layer].float()).to(torch.uint8).cpu().numpy()
    return out


# ----------------------------------------------------------------------------------------------- the card


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card_markdown(card: dict[str, Any]) -> str:
    """The Markdown model card (MODEL_CARD.md) from the JSON card."""
    tr = card.get("training", {})
    data = card.get("training_data", {})
    par = card.get("parameters", {})
    val = tr.get("validation") or {}
    hw = tr.get("hardware", {})
    kind = BundleKind.parse(card.get("kind"), "model card: entry 'kind'")
    out = card["output"]
    if kind.target == "supervoxels":
        what = "predicting 16 layers x 128 template supervoxel classes at stride 2 of a 4 mm CT input."
        use = "slicreg predict --weights <this folder> --image preprocessed_2mm.nii.gz --out supervoxels.nii.gz"
        output = [f"- output: {out['layers']} layers x {out['classes']} classes at stride {out['stride']} "
                  f"({out['voxel_centres']})", f"- **logit layout: {card['logit_layout']}**"]
    else:
        what = ("regressing the dense displacement from a scan to the template (the paper's Regression baseline) at "
                "stride 2 of a 4 mm CT input.")
        use = ("slicreg register --weights <this folder> --atlas --fixed scan.nii.gz --moving <the template image> "
               "--out-field field.nii.gz")
        output = [f"- output: {out.get('quantity', 'displacement')}, {out.get('unit', '?')}, at stride "
                  f"{out.get('stride', '?')} ({out.get('voxel_centres', '?')})"]
    network = {"deeplab/supervoxels": "3-D DeepLab (MobileNetV2 backbone, ASPP rates 2/4/8/16, grouped head)",
               "unet/supervoxels": "3-D U-Net (the paper's Slic-UNet baseline: plain conv encoder-decoder, the "
                                   "DeepLab's grouped head)",
               "deeplab/displacement": "3-D DeepLab (MobileNetV2 backbone, ASPP rates 2/4/8/16, displacement head)"}
    if "backbone" in par or not par:
        counts = (f"backbone {par.get('backbone', 0):,}, ASPP {par.get('aspp', 0):,}, head {par.get('head', 0):,}, "
                  f"total {par.get('total', 0):,}")
    else:
        counts = ", ".join(f"{k} {v:,}" for k, v in par.items() if k != "total") + f", total {par.get('total', 0):,}"
    lines = [
        "# SLIC-Reg weights bundle",
        "",
        f"{network[str(kind)]} {what}",
        "",
        "## Use",
        "",
        "```",
        use,
        "```",
        "",
        f"- input: {card['input']['normalisation']}, {card['input']['spacing_mm']:g} mm grid "
        f"({card['input']['from_preprocessed_2mm']})",
        *output,
        *([f"- kind: {kind}"] if "kind" in card else []),
        f"- parameters: {counts}",
        f"- template supervoxels: `{SUPERVOXELS_FILE}` {tuple(card['template'].get('supervoxels_shape', []))}, "
        f"sha256 `{card['template'].get('supervoxels_sha256', '?')}`",
        f"- template image sha256: `{card['template'].get('image_sha256', 'not recorded')}`",
        *([f"- made by slicreg {card['slicreg_version']}"] if card.get("slicreg_version") else []),
        "",
        *(["## Intended use and limitations", "", card.get("intended_use") or "", ""]
          if card.get("intended_use") or card.get("limitations") else []),
        *[f"- {item}" for item in card.get("limitations") or []],
        *([""] if card.get("limitations") else []),
        "## Training data",
        "",
    ]
    for k, v in data.items():
        lines.append(f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)}")
    lines += [
        "",
        "## Training",
        "",
        f"- iterations: {tr.get('iterations')}, wall time: {_fmt(tr.get('wall_s'))} s "
        f"({_fmt((tr.get('wall_s') or 0) / 60)} min)",
        f"- hardware: {hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} cores, {hw.get('torch_threads', '?')} torch "
        f"threads, {hw.get('processes', 1)} process(es), device {hw.get('device', '?')}, torch {hw.get('torch', '?')}",
        f"- precision: {tr.get('precision', '?')}",
        *([f"- started from the weights of `{tr['init_weights'].get('bundle')}` (model.pt sha256 "
           f"`{tr['init_weights'].get('model_sha256')}`), not from a random initialisation; the iterations above "
           f"are those of this run only"] if tr.get("init_weights") else []),
        f"- training scans: {len(tr.get('train_ids', []))}; validation scans: {tr.get('val_ids', [])}",
        f"- final training loss (mean of the last 25 steps): {_fmt(tr.get('final_train_loss_mean_last_25'))}",
        (f"- validation: loss {_fmt(val.get('val_loss'))}, accuracy {_fmt(val.get('val_accuracy'))}, "
         f"foreground accuracy {_fmt(val.get('val_foreground_accuracy'))} (eval mode, mean over the 16 layers)"
         if kind.target == "supervoxels" else
         f"- validation: loss {_fmt(val.get('val_loss'))}, mean end-point error {_fmt(val.get('val_epe_mm'))} mm "
         f"(eval mode)"),
        "",
        "Full configuration:",
        "",
        "```json",
        json.dumps(tr.get("config", {}), indent=2),
        "```",
        "",
    ]
    for change in tr.get("config_changes") or []:  # augmentation switched when the run was resumed
        what = "; ".join(f"`{k}` {v[0]!r} -> {v[1]!r}" for k, v in change.items() if k != "iteration")
        lines += [f"- from step {change.get('iteration')} on (the run was resumed with a changed setting): {what}; "
                  f"the configuration above is the final one", ""]
    curve = tr.get("validation_curve") or []
    if curve:
        metric, title = (("val_accuracy", "val accuracy") if kind.target == "supervoxels"
                         else ("val_epe_mm", "val end-point error (mm)"))
        lines += ["Validation curve:", "", f"| step | val loss | {title} |", "|---|---|---|"]
        lines += [f"| {c.get('iteration')} | {_fmt(c.get('val_loss'))} | {_fmt(c.get(metric))} |" for c in curve]
        lines.append("")
    if CURVES_FILE in card.get("files", {}):
        lines += [f"![curves]({CURVES_FILE})", ""]
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {n} | {e['bytes']:,} | `{e['sha256']}` |" for n, e in card.get("files", {}).items()]
    lines += ["", f"`{CARD_JSON}` and this file are covered by `{SUMS_FILE}`.", ""]
    return "\n".join(lines)
