"""Python standard-library source as long-context material for the code tasks.

Every machine that runs kvpolicy has the standard library's ``.py`` files, so code contexts need
no download. The modules are a fixed, sorted list of single-file modules present in CPython
3.10–3.13 (none was removed, turned into a package or frozen without source there); ``train``
and ``test`` use disjoint lists. The text of a module follows the interpreter's version, so an
item records that version in its ``sources`` with the module names (``stdlib-python3.11:argparse``): items are identical on
every machine with the same minor version of Python.

Code is sized at `CODE_CHARS_PER_TOKEN`, measured on the ``train`` modules (860k characters):
4.44 characters per Qwen2.5-Coder token, 4.03 per SmolLM2 token (the standard library is rich in
docstrings and comments, unlike dense code at ~3.2). 4.2 lies between, so Qwen sees ~0.95 and
SmolLM2 ~1.04 of the nominal length.
"""

from __future__ import annotations

import ast
import functools
import random
import sys
import sysconfig
from pathlib import Path

import attrs

from kvpolicy.errors import SourceUnavailableError
from kvpolicy.eval.items import Split, check_split

CODE_CHARS_PER_TOKEN = 4.2
MODULES: dict[Split, tuple[str, ...]] = {
    "train": (
        "argparse", "bdb", "calendar", "cmd", "configparser", "difflib", "ftplib", "gettext", "gzip",
        "imaplib", "mailbox", "pprint", "shutil", "smtplib", "tarfile", "textwrap", "threading", "tokenize",
    ),
    "test": (
        "bz2", "codecs", "csv", "fractions", "heapq", "lzma", "netrc", "pickle", "platform", "plistlib",
        "poplib", "queue", "random", "sched", "shlex", "socketserver", "statistics", "string", "subprocess",
        "tempfile", "timeit", "traceback", "uuid", "wave",
    ),
}  # fmt: skip
HEADER = "# ===== file: {name}.py =====\n"


def python_version() -> str:
    """The interpreter whose standard library the items are made of, e.g. ``python3.11``."""
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


@functools.cache
def module_source(name: str) -> str:
    """The source of standard-library module ``name``, read from the stdlib folder."""
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{name}.py"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceUnavailableError(
            f"the code tasks read the standard-library module {name!r} from {path}, which is missing "
            f"({exc.strerror}); this Python installation lacks its library sources"
        ) from exc


@functools.cache
def module_tree(name: str) -> ast.Module:
    return ast.parse(module_source(name))


@attrs.frozen
class Placed:
    """A module in a context: its name and the context offset of its source's first character
    (negative when the context starts inside the module)."""

    name: str
    start: int


@attrs.frozen
class CodeWindow:
    context: str
    modules: tuple[Placed, ...]

    def sources(self, split: Split) -> tuple[str, ...]:
        return (*(f"stdlib-{python_version()}:{m.name}" for m in self.modules), f"stdlib-modules:{split}")


def _top_level_starts(source: str) -> list[int]:
    """Offsets of the lines that open a top-level ``def`` or ``class``."""
    return [i for i in line_offsets(source) if source.startswith(("def ", "class "), i)]


def code_window(rng: random.Random, split: Split, chars: int) -> CodeWindow:
    """Consecutive modules of ``split`` (wrapping round the sorted list), the first from a random
    top-level ``def`` / ``class`` of a random module, about ``chars`` characters; the last module
    is cut at a line end to fit."""
    names = MODULES[check_split(split)]
    index = rng.randrange(len(names))
    skip = rng.choice(_top_level_starts(module_source(names[index])) or [0])
    parts: list[str] = []
    placed: list[Placed] = []
    total = 0
    while total < chars and len(placed) < len(names):
        name = names[index % len(names)]
        header = HEADER.format(name=name)
        source = module_source(name)[skip:]
        room = chars - total - len(header)
        if room < len(source):
            cut = source.rfind("\n", 0, max(0, room))
            source = source[: cut + 1] if cut > 0 else ""
        if not source:
            break
        placed.append(Placed(name, total + len(header) - skip))
        parts.append(header + source)
        total += len(header) + len(source)
        index, skip = index + 1, 0
    return CodeWindow("".join(parts), tuple(placed))


def line_offsets(text: str) -> list[int]:
    """Character offset of the start of each line (index 0 is line 1)."""
    offsets = [0]
    for i, char in enumerate(text):
        if char == "\n":
            offsets.append(i + 1)
    return offsets


def char_offset(source: str, offsets: list[int], lineno: int, col_byte: int) -> int:
    """The character offset of an AST position (``col_offset`` counts UTF-8 bytes)."""
    line_start = offsets[lineno - 1]
    line = source[line_start : offsets[lineno] if lineno < len(offsets) else len(source)]
    return line_start + len(line.encode("utf-8")[:col_byte].decode("utf-8", errors="ignore"))


def functions(name: str) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """``(qualified name, node)`` of every function and method of module ``name``."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((prefix + child.name, child))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(module_tree(name), "")
    return found
