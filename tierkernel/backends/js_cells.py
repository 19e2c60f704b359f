"""What the tiers that run JavaScript and TypeScript cells (``--lang js|ts``) share on the host:
their ``js_refuse`` setting and the checks a JS cell passes before it runs.

The languages, the refusable constructs and how a JS value is shown are in
``tierkernel.guest.js_node``, which the sandbox's agent runs too.
"""

from __future__ import annotations

from traitlets import Enum, List

from tierkernel.backends.base import Backend, CellRequest
from tierkernel.guest.js_node import LANGS, REFUSABLE, refused


def runs_js(backend: type[Backend] | Backend) -> bool:
    """Whether a tier runs JS and TS cells: it takes the ``--lang`` option."""
    return any(spec.name == "lang" for spec in backend.magic_options)


#: What ``%tier`` says of a tier that runs JS cells.
LANGUAGES_NOTE = f"languages={','.join(LANGS)} (--lang)"


def js_refuse_trait() -> List:  # type: ignore[type-arg]
    """The ``js_refuse`` setting of a tier that runs JS cells."""
    return List(
        Enum(list(REFUSABLE)), [],
        help="Constructs every JavaScript or TypeScript cell of this tier is refused for (a "
        "static check naming the construct and its line): eval, Function, import (dynamic "
        "import()), require, process. A cell's --strict refuses them all.",
    ).tag(config=True)


def js_cell_problem(request: CellRequest, rules: list[str], setting: str) -> str | None:
    """Why the JS cell ``request`` may not run (its ``TierUsageError`` message), or None.
    ``rules`` are the tier's ``js_refuse``, named ``setting`` in the message."""
    if request.inputs or request.outputs:
        return ("--in and --out move Python variables; a JavaScript cell shares data through "
                "the workspace (fs.readFile, fs.writeFile)")
    strict = bool(request.options.get("strict"))
    found = refused(request.body, tuple(REFUSABLE) if strict else tuple(rules),
                    str(request.options.get("lang") or "js"))
    if found is not None:
        return f"this cell uses {found}, which is not allowed here " \
               f"({'--strict' if strict else setting})"
    return None
