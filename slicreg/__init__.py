"""slicreg: inter-patient registration of abdominal CT by segmenting scans into template supervoxels.

The package is layered; low floors know nothing of the floors above them:

- :mod:`slicreg.conventions` -- the volume type, axis order and field conventions (read this first);
- :mod:`slicreg.io` -- NIfTI and field files, atomic writes, input validation;
- :mod:`slicreg.fields` -- sampling and warping with displacement fields;
- the method's stages (supervoxels, transfer, network, flow, metrics) build on those;
- :mod:`slicreg.api` -- the public API on top: ``slicreg.register``, ``slicreg.align``, ``slicreg.evaluate``.

Heavy dependencies (torch, scikit-image) are imported by the modules that need them, not here.
"""

__version__ = "0.8.0"

from slicreg.errors import ConfigError, InputError

__all__ = ["ConfigError", "Evaluation", "InputError", "Registration", "__version__", "align", "evaluate",
           "register"]

# The public API (slicreg.api, docs/api.md), imported on first use so that `import slicreg` stays cheap.
_API_NAMES = ("register", "align", "evaluate", "Registration", "Evaluation")


def __getattr__(name: str):
    import importlib

    if name in _API_NAMES:
        value = getattr(importlib.import_module("slicreg.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slicreg' has no attribute {name!r}")
