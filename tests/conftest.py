"""Shared test helpers. Under CI=true a test never skips for a missing tool: ./dev installs them all."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(*names: str) -> None:
    """Skip (locally) or fail (CI) when a system tool a test uses is missing."""
    for name in names:
        if shutil.which(name) is None and not os.path.exists(name):
            msg = f"{name} not installed (./dev setup installs it)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)


def require_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root (network namespaces)")
        pytest.skip("needs root")
