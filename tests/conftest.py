from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel_session import KernelSession
from tests.servers import http_server, openai_server

# The contract suites tierkernel ships (tierkernel.testing) assert with plain `assert`: have
# pytest explain a failing one there as it does in test modules.
pytest.register_assert_rewrite("tierkernel.testing")


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


@pytest.fixture(scope="session", autouse=True)
def no_sandbox_containers_left() -> Iterator[None]:
    """After the whole run, no sandbox container may be left on the engine.

    Kernels shut down by the tests remove their containers themselves; the spare containers
    they leave ready for later kernels are removed here. Those of kernels the
    tests killed with SIGKILL are removed by the next kernel that starts; the last such kernel
    may have no successor, so the same reaping is done here first (as a new kernel would).
    """
    yield
    from tests import sandbox_support

    if not sandbox_support.status()[0]:
        return
    from tierkernel.backends.sandbox.reaper import reap_orphans, remove_spares

    reap_orphans(sandbox_support.client())
    # Spares are made to outlive their kernel (for the next one); the run removes its own.
    remove_spares(sandbox_support.client())
    left = sandbox_support.all_sandbox_containers()
    assert left == [], f"sandbox containers left after the test run: {left}"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """The port of a test HTTP server on 127.0.0.1 (see tests/servers.py for its endpoints)."""
    with http_server() as p:
        yield p


@pytest.fixture(scope="module")
def ai_url() -> Iterator[str]:
    """The base URL of a local OpenAI-compatible server process (chat and embeddings)."""
    with openai_server() as url:
        yield url
