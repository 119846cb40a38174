"""The project files a module really imports: its static import closure inside the project.

A stage's code dependencies (DVC ``deps`` and the code digest in its manifest) are this closure
of its entry module, computed from the source with ``ast`` rather than listed by hand, so a new
or moved module is a dependency the moment something imports it.

Every ``import`` and ``from ... import`` in a file counts, function-local ones included (they
run when the function does); only imports of the project's packages (``wanda``, ``tasks``) are
followed, and each resolves to a file:

- ``import a.b`` and ``from a import b`` where ``a/b`` is a module: that module's file;
- ``from a import name`` where ``name`` is not a module: ``a/__init__.py`` (or ``a.py``), and
  from there whatever it imports;
- relative imports resolve against the importing module's package.

A package's ``__init__.py`` is not added merely because Python runs it on the way to a submodule:
``wanda/__init__.py`` only re-exports names, and counting it would make every stage depend on
every module of the library. It is a dependency where a stage uses names from it.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wanda", "tasks")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a dotted module inside the project, or None (not ours, or no such module)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path, root: Path) -> list[str]:
    return list(path.relative_to(root).parts[:-1])  # a module's package; an __init__'s own package


def imported_files(path: Path, root: Path = ROOT) -> set[Path]:
    """Project files that ``path`` imports directly (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                file = module_file(alias.name, root)
                if file is not None:
                    found.add(file)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, root)
                package = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                file = module_file(f"{base}.{alias.name}", root) if alias.name != "*" else None
                if file is None:  # a name defined in (or re-exported by) the module itself
                    file = module_file(base, root)
                if file is not None:
                    found.add(file)
    found.discard(path)
    return found


@lru_cache(maxsize=None)
def closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """Every project file ``module`` imports, directly or not, itself first, then sorted;
    paths relative to ``root`` in POSIX form."""
    start = module_file(module, root)
    if start is None:
        raise ValueError(f"{module!r} is not a module of the project under {root}")
    seen = {start}
    stack = [start]
    while stack:
        for file in imported_files(stack.pop(), root):
            if file not in seen:
                seen.add(file)
                stack.append(file)
    rel = sorted(p.relative_to(root).as_posix() for p in seen - {start})
    return (start.relative_to(root).as_posix(), *rel)
