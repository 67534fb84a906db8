"""Shared pytest fixtures: locations of the real data in ../shared (read-only, never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_STUDY = SHARED_DATA / "real-ct" / "lung-pet-ct-dx-A0001"


@pytest.fixture(scope="session")
def real_study() -> Path:
    if not REAL_STUDY.is_dir():
        pytest.skip(f"real study not found at {REAL_STUDY}")
    return REAL_STUDY


@pytest.fixture(scope="session")
def real_lung_series(real_study: Path) -> list[Path]:
    return sorted((real_study / "lung-kernel-L-5mm").glob("*.dcm"))
