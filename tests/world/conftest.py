"""Shared fixtures: a few hundred scenes of the default world, drawn once per test session."""

from __future__ import annotations

import pytest

from sharegpt4v.config import WorldConfig
from sharegpt4v.world import Scene, sample_scene


@pytest.fixture(scope="session")
def cfg() -> WorldConfig:
    return WorldConfig()


@pytest.fixture(scope="session")
def scenes(cfg: WorldConfig) -> list[Scene]:
    return [sample_scene(11, i, cfg) for i in range(300)]
