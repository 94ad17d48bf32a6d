"""loracompose.lazy: a LazyImport stands in for its target everywhere a method module uses one, and
imports nothing until then; lazy package exports resolve to the real objects."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

from loracompose.lazy import LazyImport


def test_lazy_import_behaves_like_its_target():
    ordered = LazyImport("collections", "OrderedDict")
    instance = ordered(a=1)  # call
    assert type(instance) is OrderedDict and instance == {"a": 1}
    assert isinstance(instance, ordered) and isinstance(instance, (int, ordered))  # isinstance, tuples too
    assert issubclass(OrderedDict, ordered)
    assert ordered.fromkeys("ab") == OrderedDict.fromkeys("ab")  # attributes, classmethods

    class Sub(ordered):  # subclassing resolves the base
        pass

    assert Sub.__mro__[1] is OrderedDict
    module = LazyImport("collections")
    assert module.OrderedDict is OrderedDict and module.resolve() is sys.modules["collections"]


def test_nothing_is_imported_before_first_use():
    code = """
import sys
from loracompose.lazy import LazyImport
wave = LazyImport("wave")
assert "wave" not in sys.modules
assert wave.Error.__name__ == "Error" and "wave" in sys.modules
"""
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_package_exports_are_the_real_objects():
    import loracompose
    from loracompose.methods.merge import Merge
    from loracompose.pipelines.values import Branch

    assert loracompose.Merge is Merge and loracompose.pipelines.Branch is Branch
    assert "Merge" in dir(loracompose)
