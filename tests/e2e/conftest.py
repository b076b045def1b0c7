"""Whole-mesh fixtures. ``mesh`` is one `meshserve up` per test module (starting a
mesh costs seconds of CPU); a module that needs other flags calls ``start_mesh``
itself or overrides this fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.mesh import Mesh, start_mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("mesh"))
    try:
        yield running
    finally:
        running.stop()
