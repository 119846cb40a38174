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

Plug-ins loaded by discovery are imports too: a package that walks its own folder
(``pkgutil.iter_modules(__path__)`` or ``pkgutil.walk_packages(__path__)``, the way
``wanda/methods`` loads every method module) imports every module in it, so a module dropped
into that folder is a dependency of whatever imports the package, at once. Any other dynamic
import (``importlib.import_module`` or ``__import__`` of a computed name) cannot be followed
statically, so it is refused with its place named rather than silently left out of the deps.
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


class DynamicImportError(ValueError):
    """A project module imports by a computed name the closure cannot follow."""


_WALKERS = {"iter_modules": False, "walk_packages": True}  # pkgutil function -> recursive
# Files whose computed imports are covered by static imports elsewhere, and why (reviewed by hand).
COVERED_DYNAMIC_IMPORTS = {
    "wanda/lazy.py": "the deferred-import helpers: every package that re-exports lazily keeps the same imports "
                     "under TYPE_CHECKING (read here like any import), and lazy_module stands for third-party "
                     "modules (torch)",
}
_IMPORTERS = ("import_module", "__import__")


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _walks_own_path(node: ast.Call) -> bool:
    """``pkgutil.iter_modules(__path__)`` / ``walk_packages(__path__, ...)``."""
    first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "path"), None)
    return isinstance(first, ast.Name) and first.id == "__path__"


def package_modules(package_dir: Path, recursive: bool) -> set[Path]:
    """Every module file of a package folder (``__init__.py`` of sub-packages included)."""
    pattern = "**/*.py" if recursive else "*.py"
    found = {p for p in package_dir.glob(pattern) if "__pycache__" not in p.parts}
    if not recursive:
        found |= {p / "__init__.py" for p in package_dir.iterdir() if (p / "__init__.py").is_file()}
    return found


def _discovered_files(path: Path, tree: ast.AST, root: Path) -> set[Path]:
    """Modules ``path`` loads by discovery; raises on a dynamic import it cannot follow."""
    found: set[Path] = set()
    walks = False
    importers: list[ast.Call] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name in _WALKERS and _walks_own_path(node):
            if path.name != "__init__.py":
                raise DynamicImportError(f"{path.relative_to(root)}:{node.lineno}: only a package's __init__.py "
                                         "may discover modules through its own __path__")
            found |= package_modules(path.parent, _WALKERS[name])
            walks = True
        elif name in _IMPORTERS and node.args:
            importers.append(node)
    for node in importers:
        target = node.args[0]
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            file = module_file(target.value, root)
            if file is not None:
                found.add(file)
        elif not walks and path.relative_to(root).as_posix() not in COVERED_DYNAMIC_IMPORTS:
            # a computed name that no folder walk in this file accounts for
            raise DynamicImportError(
                f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)} imports a computed module name that "
                "the stage code dependencies cannot follow; import the module explicitly, or discover a package's "
                "own modules with pkgutil.iter_modules(__path__) in its __init__.py")
    return found


def imported_files(path: Path, root: Path = ROOT) -> set[Path]:
    """Project files that ``path`` imports directly (anywhere in the file), plugin modules that
    it discovers included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[Path] = _discovered_files(path, tree, root)
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
