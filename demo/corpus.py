"""The demo's training text: docstrings of Python's standard library, and the transforms the adapters learn.

The stdlib is on every machine that runs Python, so nothing is downloaded. Its exact content depends on the
Python version (the manifest records a digest of the corpus used for the committed assets).
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import itertools
import re
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

# Test suites, GUI demos and vendored code have docstrings that read nothing like library documentation.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "tkinter"}
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_MIN_CHARS = 24
_WORD = re.compile(r"[a-z]{2,}")


def stdlib_docstrings(*, root: Path | None = None) -> list[str]:
    """Every module, class and function docstring of the stdlib, in a stable order, normalised."""
    base = root if root is not None else Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(base.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(base).parts):
            continue
        docs.extend(_file_docstrings(path))
    return docs


def _file_docstrings(path: Path) -> Iterable[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately invalid (badsyntax_*)
        return
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            raw = ast.get_docstring(node, clean=True)
            doc = normalize(raw) if raw else None
            if doc:
                yield doc


def normalize(doc: str) -> str | None:
    """Reflow prose paragraphs onto one line each, drop doctest and code blocks; None if too little is left.

    One line per paragraph keeps hard wraps (an artefact of 79-column sources) out of what the model learns,
    and gives the reverse-words transform whole sentences to work on.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        lines = block.splitlines()
        if any(line.lstrip().startswith((">>>", "...", "$ ")) for line in lines):
            continue
        if any(line.startswith((" ", "\t")) for line in lines):  # indented: a table, a list, code
            paragraphs.append(block.rstrip())
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    text = "\n\n".join(paragraphs).strip()
    return text if len(text) >= _MIN_CHARS and text.isascii() else None


def corpus_digest(docs: Iterable[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# -- transforms -----------------------------------------------------------------------------------------


def upper(text: str) -> str:
    return text.upper()


def rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def reverse_words(text: str) -> str:
    """Words of every line in reverse order; whitespace runs between words become one space."""
    return "\n".join(" ".join(reversed(line.split())) for line in text.split("\n"))


# name -> (transform, inverse). The inverse of upper is lossy (lower), which is enough to read the text back.
TRANSFORMS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "upper": (upper, str.lower),
    "rot13": (rot13, rot13),
    "reverse": (reverse_words, reverse_words),
}


# -- measuring text -------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lowercase alphabetic words of two letters or more."""
    return _WORD.findall(text.lower())


def common_words(docs: Iterable[str], *, count: int) -> frozenset[str]:
    """The ``count`` most frequent words of the corpus: a dictionary for 'does this read like the corpus'."""
    counts = Counter(w for doc in docs for w in words(doc))
    return frozenset(w for w, _ in counts.most_common(count))


def dictionary_share(text: str, dictionary: frozenset[str]) -> float:
    """Fraction of the text's words found in ``dictionary`` (0 for text without words)."""
    found = words(text)
    return sum(w in dictionary for w in found) / len(found) if found else 0.0


def uppercase_share(text: str) -> float:
    """Fraction of the letters that are uppercase (0 for text without letters)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def common_bigrams(docs: Iterable[str], *, count: int) -> frozenset[tuple[str, str]]:
    """The ``count`` most frequent pairs of adjacent words: a test of word order."""
    counts = Counter(pair for doc in docs for line in doc.split("\n") for pair in _pairs(words(line)))
    return frozenset(p for p, _ in counts.most_common(count))


def bigram_share(text: str, bigrams: frozenset[tuple[str, str]]) -> float:
    """Fraction of adjacent word pairs (within a line) found in ``bigrams`` (0 for fewer than two words)."""
    pairs = [p for line in text.split("\n") for p in _pairs(words(line))]
    return sum(p in bigrams for p in pairs) / len(pairs) if pairs else 0.0


def _pairs(seq: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(seq))
