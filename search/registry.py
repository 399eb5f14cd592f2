"""`search.method` → the searcher class that implements it (`search.base`'s protocol).

One line per method: the module is imported when the method is looked up, so a method's code and its settings
dataclass live in its own module, and adding a method is that module, its line here, its tests and a YAML config.
"""

from __future__ import annotations

import importlib
from typing import Any

from search.base import SearchConfigError, SearchContext, Searcher

METHODS: dict[str, str] = {
    "fixed": "search.base:FixedSearcher",
    "uniform-budget": "search.autodim:UniformBudgetSearcher",
    "autodim": "search.autodim:AutoDimSearcher",
    "scall": "search.scall:ScallSearcher",
    "esapn": "search.esapn:EsapnSearcher",
    "md": "search.md:MdSearcher",
    "ciess": "search.ciess:CiessSearcher",
    "joint": "search.joint:JointSearcher",
}


def searcher_class(method: str) -> type[Searcher]:
    """The class registered for `method`.

    Raises:
        SearchConfigError: `method` is not registered; the message lists the registered ones.
    """
    if method not in METHODS:
        raise SearchConfigError(f"unknown search.method '{method}'; the registered methods are {sorted(METHODS)}")
    module, name = METHODS[method].split(":")
    cls: type[Searcher] = getattr(importlib.import_module(module), name)
    return cls


def settings_class(method: str) -> type:
    """The dataclass of `method`'s own config section (`search.<method>`)."""
    return searcher_class(method).settings_class


def build_searcher(method: str, settings: Any, context: SearchContext) -> Searcher:
    """`method`'s searcher for `settings` (None: its defaults), checked against what the job serves it."""
    cls = searcher_class(method)
    cls.check(context)
    return cls.from_config(settings if settings is not None else cls.settings_class(), context)
