"""The magic-line options of the sandbox tier: the shared ones (``--lang``/``--strict`` as in
the wasm tier), and ``--runtime``, its own."""

from __future__ import annotations

import re

from tierkernel.backends.options import (
    CPUS,
    HELPER_POLICY,
    LANG,
    MEMORY,
    STRICT,
    TIMEOUT,
    VALUE_OPTIONS,
    OptionSpec,
)
from tierkernel.errors import TierUsageError

_RUNTIME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_RUNTIME_ALIASES = {"gvisor": "runsc"}


def parse_runtime(text: str) -> str:
    """Parse a container runtime name: ``runc``, ``runsc`` (``gvisor`` is taken as ``runsc``).

    Only the spelling is checked here; the tier checks that its engine has the runtime.
    """
    name = text.strip().lower()
    if not _RUNTIME.match(name):
        raise TierUsageError(
            f"--runtime expects a container runtime name such as runc or runsc, got {text!r}"
        )
    return _RUNTIME_ALIASES.get(name, name)


RUNTIME = OptionSpec("runtime", "NAME",
                     "container runtime of the tier's session: runc, or runsc for gVisor",
                     parse_runtime)

#: What ``%%tier sandbox`` takes (``SandboxBackend.magic_options``).
OPTIONS = (TIMEOUT, MEMORY, CPUS, RUNTIME, *HELPER_POLICY, *VALUE_OPTIONS, LANG, STRICT)
