"""Shared pytest fixtures: locations of the real data (read in place, never copied).

The data root is ``$LUNGBURDEN_DATA`` (``make test`` sets it to the data folder beside the
project); tests that need real data are skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGBURDEN_DATA") or ROOT.parent / "shared" / "data")
REAL_STUDY = SHARED_DATA / "real-ct" / "lung-pet-ct-dx-A0001"


@pytest.fixture(scope="session")
def real_study() -> Path:
    if not REAL_STUDY.is_dir():
        pytest.skip(f"real study not found at {REAL_STUDY}")
    return REAL_STUDY


@pytest.fixture(scope="session")
def real_lung_series(real_study: Path) -> list[Path]:
    return sorted((real_study / "lung-kernel-L-5mm").glob("*.dcm"))
