"""No import cycles between the package's modules (``benchmarks/import_graph.py`` draws the graph)."""

from __future__ import annotations

import pytest

from conftest import benchmark_script


@pytest.fixture(scope="module")
def import_graph():
    return benchmark_script("import_graph")


def test_the_package_has_no_import_cycle(import_graph):
    mods, edges = import_graph.graph()
    assert "lalic_codec.pipeline" in mods and "lalic_codec.kernels.biwkv" in mods and "lalic_codec.models.base" in mods
    assert import_graph.cycles(edges) == [], "import cycles (python benchmarks/import_graph.py shows them)"


def test_the_graph_follows_relative_lazy_and_cross_package_imports(import_graph):
    _, edges = import_graph.graph()
    # "from .biwkv_ref import EPS" inside kernels/
    assert "lalic_codec.kernels.biwkv_ref" in edges["lalic_codec.kernels.biwkv_naive"]
    # "from . import api" inside a function of lalic_codec/__init__.py
    assert "lalic_codec.api" in edges["lalic_codec"]
    # the pipeline writes the container
    assert "lalic_codec.formats.container" in edges["lalic_codec.pipeline"]


def test_the_cycle_check_finds_cycles(import_graph, capsys, monkeypatch):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]
    monkeypatch.setattr(import_graph, "graph", lambda: ({}, edges))
    assert import_graph.main(["--quiet"]) == 1
    assert "cycle: a <-> b <-> c" in capsys.readouterr().out
