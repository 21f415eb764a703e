"""A small world dataset (test split only), rendered once per session."""

from __future__ import annotations

import pytest

from sharegpt4v.config import WorldConfig
from sharegpt4v.world.generate import generate_world


@pytest.fixture(scope="session")
def world_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("eval-world") / "world")
    generate_world(uri, 5, 3, WorldConfig(splits={"val": 0.2, "test": 0.8}), progress=False)
    return uri
