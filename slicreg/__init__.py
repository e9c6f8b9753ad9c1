"""slicreg: inter-patient registration of abdominal CT by segmenting scans into template supervoxels.

The package is layered; low floors know nothing of the floors above them:

- :mod:`slicreg.conventions` -- the volume type, axis order and field conventions (read this first);
- :mod:`slicreg.io` -- NIfTI and field files, atomic writes, input validation;
- :mod:`slicreg.fields` -- sampling and warping with displacement fields;
- the method's stages (supervoxels, transfer, network, flow, metrics) build on those.

Heavy dependencies (torch, scikit-image) are imported by the modules that need them, not here.
"""

__version__ = "0.1.0"

from slicreg.errors import ConfigError, InputError  # noqa: E402

__all__ = ["ConfigError", "InputError", "__version__"]
