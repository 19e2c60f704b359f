"""``python -m tierkernel``: launch the kernel (what the kernelspec's argv runs)."""

from typing import Any

from tierkernel.backends.sandbox import head_start as sandbox_head_start


def _sandbox_tier() -> Any:
    """The sandbox tier's backend class, imported in the head start's helper only: this
    process goes on importing ipykernel meanwhile."""
    from tierkernel.backends.sandbox.backend import SandboxBackend

    return SandboxBackend


# First of all, while this is the only thread: the sandbox tier's head start imports in a
# helper on the other core while this process imports ipykernel (see head_start.py).
sandbox_head_start.fork_early(_sandbox_tier)

from tierkernel.kernel.app import main  # noqa: E402 - after the fork, on purpose

if __name__ == "__main__":
    main()
