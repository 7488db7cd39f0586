"""Every ``>>>`` example in chatobs's and chatpipe's docstrings runs as written: an example a
reader copies must give what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import chatobs
import chatpipe


def _modules() -> list[str]:
    names = []
    for package in (chatobs, chatpipe):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith(".__main__"):  # importing one runs its service
                names.append(module.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_the_examples_in_a_modules_docstrings_give_what_they_show(name: str) -> None:
    module: ModuleType = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples in {name} fail (the report above names them)"
