"""docs/internal-api.md names every public name of revault/, and nothing else.

The page's ```python blocks are read with a small grammar: a line `# revault/NAME.py`
says which module the following lines describe; at column 0, `class X`, `def x`,
`async def x`, `X = ...` and `X: ...` (several per line with `;`, several targets with
`A, B = ...`) name a module attribute; indented by four under a class, `def x`,
`async def x`, `x: ...` and `x = ...` name a member of it. Everything else (comments,
deeper indentation, decorators) is prose for the reader.

Public means: assigned, defined or imported-and-re-exported (`__all__`) at module level
in the module's own source, name not starting with `_`, loggers excepted.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "internal-api.md"
PACKAGE = REPO / "revault"

_MODULE_LINE = re.compile(r"#\s*revault/(\w+)\.py\b")
_TOP = re.compile(r"(?:async\s+def|def|class)\s+(\w+)|(\w+(?:\s*,\s*\w+)*)\s*(?:=|:)")
_MEMBER = re.compile(r"    (?:(?:async\s+def|def)\s+(\w+)|(\w+(?:\s*,\s*\w+)*)\s*(?::|=))")


def documented() -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]]]:
    """({module: names}, {(module, class): members}) read from the page's code blocks."""
    names: dict[str, set[str]] = {}
    members: dict[tuple[str, str], set[str]] = {}
    module = cls = None
    in_block = False
    for line in DOC.read_text().splitlines():
        line = re.split(r"\s#\s", line, maxsplit=1)[0].rstrip()  # a trailing comment is prose
        if line.startswith("```"):
            in_block = line.strip() == "```python"
            module = cls = None
            continue
        if not in_block:
            continue
        found = _MODULE_LINE.fullmatch(line.split(":")[0].strip()) if line.startswith("#") \
            else None
        if found:
            module, cls = found.group(1), None
            names.setdefault(module, set())
            continue
        if not line.strip() or line.lstrip().startswith(("#", "@")):
            continue
        assert module is not None, f"code line before any `# revault/NAME.py` line: {line!r}"
        if not line[0].isspace():
            cls = None
            for statement in line.split(";"):
                m = _TOP.match(statement.strip())
                assert m, f"cannot read a name in: {statement.strip()!r}"
                if m.group(1):
                    names[module].add(m.group(1))
                    if statement.strip().startswith("class "):
                        cls = m.group(1)
                        members.setdefault((module, cls), set())
                else:
                    names[module].update(n.strip() for n in m.group(2).split(","))
        elif cls is not None:
            m = _MEMBER.match(line)
            if m:
                members[(module, cls)].update(
                    [m.group(1)] if m.group(1) else [n.strip() for n in m.group(2).split(",")])
    return names, members


def public_names(module: str) -> set[str]:
    """Module-level names the module's own source defines (or re-exports in __all__)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                    and value.func.attr == "getLogger"):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        out.add(n.id)
    exported = getattr(importlib.import_module(f"revault.{module}"), "__all__", ())
    out.update(exported)
    return {n for n in out if not n.startswith("_") and n != "__all__"}


def has_member(cls: type, name: str) -> bool:
    """A class attribute, a dataclass field, an annotation, or an instance attribute
    that one of the class's own methods assigns (`self.name = ...`)."""
    if hasattr(cls, name):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    for base in cls.__mro__:
        if name in getattr(base, "__annotations__", {}):
            return True
        if base.__module__.startswith("revault."):
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(base)))):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name) and node.value.id == "self"
                        and node.attr == name):
                    return True
    return False


def test_every_documented_name_exists():
    names, members = documented()
    missing = [f"revault.{module}.{name}" for module, listed in sorted(names.items())
               for name in sorted(listed)
               if not hasattr(importlib.import_module(f"revault.{module}"), name)]
    for (module, cls_name), listed in sorted(members.items()):
        cls = getattr(importlib.import_module(f"revault.{module}"), cls_name, None)
        if cls is None:
            continue  # reported above
        missing += [f"revault.{module}.{cls_name}.{m}" for m in sorted(listed)
                    if not has_member(cls, m)]
    assert not missing, "docs/internal-api.md names what does not exist:\n" + "\n".join(missing)


def test_every_public_name_is_documented():
    names, _ = documented()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    undocumented = [f"revault.{module}.{name}" for module in modules
                    for name in sorted(public_names(module) - names.get(module, set()))]
    assert not undocumented, ("docs/internal-api.md does not list:\n"
                              + "\n".join(undocumented))


def test_the_grammar_reads_what_it_should():
    # The checks above are only as good as this reader: a page that lost its blocks, or
    # a grammar that silently skipped lines, would pass them vacuously.
    names, members = documented()
    assert "Dispatcher" in names["rpc"] and "handle" in members[("rpc", "Dispatcher")]
    assert {"MAX_PLAINTEXT", "ACT_ONE_LEN", "ACT_TWO_LEN"} <= names["transport"]
    assert sum(len(v) for v in names.values()) > 150
