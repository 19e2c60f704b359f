from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel_session import KernelSession


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    """A tierkernel kernel shared by the tests of one module (they must not depend on order
    beyond what each test sets up itself)."""
    session = KernelSession()
    yield session
    session.close()


@pytest.fixture()
def fresh_kernel() -> Iterator[KernelSession]:
    """A tierkernel kernel of one's own, for tests that change its default tier or kill it."""
    session = KernelSession()
    yield session
    session.close()
