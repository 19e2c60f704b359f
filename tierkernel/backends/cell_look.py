"""A static look at a cell, for ``Backend.can_run`` and ``%tier auto``: the modules it imports,
whether it runs shell commands, the names it reads and assigns. Nothing is run; IPython syntax
(``!cmd``, ``%magic``) is read line by line, so a cell that is not plain Python still gets an
answer, and a cell that does not parse reads and assigns nothing as far as this can tell.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
import symtable

_IMPORT = re.compile(r"^\s*(?:from\s+([A-Za-z_][\w.]*)\s+import\b"
                     r"|import\s+([\w.,\s]+?)\s*(?:#.*)?$)")
_SHELL_LINE = re.compile(r"^\s*(!|%%(bash|sh|script|system)\b|%(system|sx)\b|\w+\s*=\s*!)")
#: Calls that start another program: what a tier without processes cannot do.
_SPAWN = re.compile(r"\b(subprocess\.\w+|os\.(system|popen|fork|exec\w*|spawn\w*)|pty\.spawn)\s*\(")
_BUILTINS = frozenset(dir(builtins))


@functools.lru_cache(maxsize=256)
def imports(code: str) -> frozenset[str]:
    """The top-level modules ``code`` imports (``import a.b, c`` and ``from d.e import f``:
    a, c, d); relative imports are left out."""
    found: set[str] = set()
    for line in code.splitlines():
        match = _IMPORT.match(line)
        if match is None:
            continue
        if match.group(1):
            found.add(match.group(1).split(".")[0])
        else:
            for part in match.group(2).split(","):
                name = part.strip().split()[0] if part.strip() else ""
                if name:
                    found.add(name.split(".")[0])
    return frozenset(found)


def runs_shell(code: str) -> bool:
    """Whether ``code`` has a shell line (``!cmd``, ``x = !cmd``, ``%%bash``, ``%system``)."""
    return any(_SHELL_LINE.match(line) for line in code.splitlines())


def spawns(code: str) -> str | None:
    """The first call in ``code`` that starts another program (``subprocess.run(``,
    ``os.system(``...), or None."""
    match = _SPAWN.search(code)
    return match.group(1) if match else None


@functools.lru_cache(maxsize=256)
def names(code: str) -> tuple[frozenset[str], frozenset[str]]:
    """(names read before the cell assigns them, names the cell assigns at its top level);
    empty when the cell is not plain Python."""
    try:
        tree = ast.parse(code)
        table = symtable.symtable(code, "<cell>", "exec")
    except (SyntaxError, ValueError):
        return frozenset(), frozenset()
    # Only names looked up in the cell's global scope: a function's parameters, a lambda's
    # or a comprehension's variables are their own scope's, never the kernel's.
    global_reads = _global_reads(table)
    module_stores = {symbol.get_name() for symbol in table.get_symbols()
                     if symbol.is_assigned() or symbol.is_imported()}
    assigned: set[str] = set()
    read: set[str] = set()
    for statement in tree.body:
        loads, stores = _names_in(statement)
        if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
            global_reads.add(statement.target.id)  # x += 1 reads x first
        read |= (loads & global_reads) - assigned
        assigned |= stores & module_stores
    return frozenset(read - _BUILTINS), frozenset(assigned)


def _global_reads(table: symtable.SymbolTable) -> set[str]:
    """The names ``table`` and the scopes inside it read from the module's global scope."""
    module = table.get_type() == "module"
    out = {symbol.get_name() for symbol in table.get_symbols()
           if symbol.is_referenced() and (module or symbol.is_global())}
    for child in table.get_children():
        out |= _global_reads(child)
    return out


def _names_in(statement: ast.stmt) -> tuple[set[str], set[str]]:
    loads: set[str] = set()
    stores: set[str] = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Del):
            (loads if isinstance(node.ctx, ast.Load) else stores).add(node.id)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            loads.add(node.target.id)  # x += 1 reads x first
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        stores = {statement.name}  # what the body binds is its own
    elif isinstance(statement, (ast.Import, ast.ImportFrom)):
        stores = {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    return loads, stores
