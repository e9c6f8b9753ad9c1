"""The top floor of slicreg: the cached stage runner, the stage definitions, the ``slicreg`` command and the
pipeline configurations (``pipelines/*.toml``). It may import :mod:`preprocessing` and :mod:`slicreg`;
they never import it."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_PIPELINE = CONFIG_DIR / "demo.toml"
