"""The chaos harness's modules import against the current meepo: `make chaos` is not
part of `make test`, so a rename in meepo would otherwise break it unnoticed."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module", ["chaos.run", "chaos.worker", "chaos.producer", "chaos.check"])
def test_a_chaos_module_imports(module: str) -> None:
    importlib.import_module(module)
