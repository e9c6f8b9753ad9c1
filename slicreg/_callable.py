"""Modules that are also the API functions of the same name: ``slicreg.register(...)``, ``slicreg.align(...)``.

``slicreg.register`` is the module of the method (:mod:`slicreg.register`) and ``slicreg.align`` the package of
the toolkit (:mod:`slicreg.align`); Python binds a package's attribute to its submodule whenever the submodule is
imported, so a plain function of that name in ``slicreg/__init__.py`` would be replaced by the module. Instead
the module itself is made callable: calling it calls :func:`slicreg.api.register` / :func:`slicreg.api.align`,
and everything else (``from slicreg.register import ...``, ``slicreg.align.register_pair``) is the module as
before.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _ApiModule(types.ModuleType):
    """A module whose call is the function ``slicreg.api.<__api_function__>``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from slicreg import api

        return getattr(api, self.__dict__["__api_function__"])(*args, **kwargs)


def make_callable(module_name: str, function: str) -> None:
    """Make the (imported) module ``module_name`` call ``slicreg.api.<function>`` when called."""
    module = sys.modules[module_name]
    module.__dict__["__api_function__"] = function
    module.__class__ = _ApiModule
