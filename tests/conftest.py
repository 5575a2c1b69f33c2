"""Shared test fixtures: where ../shared lives, and a skip that says why when it does not."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts) -> Path:
    """A file under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared artifacts live beside the project at ../shared")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
