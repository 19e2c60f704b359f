"""What a cell can be granted on its ``%%tier`` line: the runtime helpers by name, and the
hosts ``api()`` may reach by pattern.

A leaf of the runtime: the policy and the broker check against these names and patterns, and
the tiers' option parsers (``tierkernel.backends.options``) read ``--allow`` and ``--domains``
with them, so both sides agree on what a valid grant is.
"""

from __future__ import annotations

import re

#: The runtime helpers a cell can be allowed to call (``--allow``).
HELPERS = ("ai", "api", "db", "console")

_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def is_domain_pattern(domain: str) -> bool:
    """Whether ``domain`` is ``*``, a host name, an IP address or ``*.`` + a host name."""
    if domain == "*":
        return True
    if domain.startswith("[") and domain.endswith("]"):  # an IPv6 literal, as URLs write it
        return all(c in "0123456789abcdef:." for c in domain[1:-1]) and ":" in domain
    name = domain[2:] if domain.startswith("*.") else domain
    return all(_DOMAIN_LABEL.match(label) for label in name.split("."))
