"""Import closure of project modules, read statically from source (stdlib only).

Used to derive each DVC stage's code dependencies for dvc.yaml, so a stage reruns when any
project file it can import changes, and not when an unrelated one does.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

PACKAGES: tuple[str, ...] = ("ml", "dalle3_dag")


def module_file(module: str, root: Path) -> Path | None:
    """The file that defines `module` under `root` (package `__init__.py` first, as Python
    resolves it), or None when it is not a project file (third-party, namespace dir, missing)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_name(base.name + ".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`: imports under it never run."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, functions included, minus `if TYPE_CHECKING:` bodies."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: Iterable[ast.AST] = node.orelse
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        yield from _import_nodes(child)


def _package_of(path: Path, root: Path) -> list[str] | None:
    """Dotted parts of the package `path` belongs to (for relative imports); None if outside."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return list(rel.parent.parts)


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a submodule first runs its packages."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def project_imports(path: Path, root: Path, packages: tuple[str, ...] = PACKAGES) -> set[str]:
    """Dotted names of the project modules (with their parent packages) that `path` imports,
    lazily inside functions included; only names backed by a file under `root` are returned."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    candidates: list[str] = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            candidates.extend(alias.name for alias in node.names)
            continue
        if node.level:
            package = _package_of(path, root)
            if package is None or node.level - 1 > len(package):
                continue
            base_parts = package[: len(package) - (node.level - 1)]
            if node.module:
                base_parts += node.module.split(".")
            if not base_parts:
                continue
            base = ".".join(base_parts)
        elif node.module:
            base = node.module
        else:
            continue
        candidates.append(base)
        # `from a.b import c` imports submodule a.b.c when it exists (else c is an attribute).
        candidates.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    found: set[str] = set()
    for name in candidates:
        if name.split(".")[0] not in packages:
            continue
        found.update(m for m in _with_parents(name) if module_file(m, root) is not None)
    return found


def closure(modules: Iterable[str], root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Sorted POSIX paths (relative to `root`) of every project file transitively reachable
    from `modules`, their own files and parent `__init__.py` included.

    Raises ValueError for a starting module with no file under `root`, so a typo in a stage's
    module does not silently give it no code dependencies.
    """
    seen: set[str] = set()
    todo: list[str] = []
    for module in modules:
        if module_file(module, root) is None:
            raise ValueError(f"module {module!r} has no file under {root}")
        todo.extend(m for m in _with_parents(module) if module_file(m, root) is not None)
    files: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(module, root)
        if path is None:
            continue
        files.add(path.relative_to(root).as_posix())
        todo.extend(project_imports(path, root, packages) - seen)
    return sorted(files)
