"""The compute device: one check of a ``--device`` string before any work.

Everything in slicreg takes an explicit ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``); this module turns the
user's string into a :class:`torch.device` that exists on this machine, or one :class:`InputError`."""

from __future__ import annotations

from slicreg.errors import InputError


def resolve_device(device: object, *, what: str = "--device") -> torch.device:  # noqa: F821
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` (or a torch.device) -> a usable :class:`torch.device`.

    Raises:
        InputError: not a device string torch knows, a device type this build cannot use, CUDA asked for on a
            machine (or torch build) without it, or a CUDA index beyond the devices present.
    """
    import torch

    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what}: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"{what}: {device!r} asked for, but {build}; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{what}: {device!r} asked for, but only {count} CUDA device(s) exist (0..{count - 1})")
        return dev
    raise InputError(f"{what}: device type {dev.type!r} is not supported, expected cpu or cuda")
