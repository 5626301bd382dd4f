"""The English training corpus of the tiny trained MoE: the Python documentation from Debian.

Debian's python3-doc (python3.X-doc) ships the reStructuredText sources of the whole Python manual
(tutorial, library and language reference, HOWTOs, what's new) as plain text files: ~12 MB of
English prose with code examples, no markup conversion needed beyond stripping reST directives and
roles. It is on every Debian mirror, versioned, and redistributable (PSF licence).
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)

PACKAGE = "python3-doc"
SOURCES = Path("/usr/share/doc")
SOURCES_GLOB = "python3.*/html/_sources"
HELD_OUT_EVERY = 20  # every 20th document (sorted by path) is held out for perplexity

_HEADING_RULE = re.compile(r"^([=\-~*^#\"'+`.:])\1{3,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(\S[^:]*)?::")
_LABEL_OR_COMMENT = re.compile(r"^\s*\.\.(\s+_\S.*:|\s*$|\s+[^\s:][^:]*$)")
_OPTION = re.compile(r"^\s+:[\w-]+:")
_ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")
# Directives whose bodies are metadata, not text.
_DROP_BODY = {"index", "toctree", "highlight", "sectionauthor", "moduleauthor", "testsetup", "testcleanup", "raw"}


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    held_out: list[str]
    source: str  # which package (and version) the text came from

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.train)

    @property
    def held_out_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.held_out)


def sources_dir() -> Path | None:
    found = sorted(p for p in SOURCES.glob(SOURCES_GLOB) if re.fullmatch(r"python3\.\d+", p.parts[-3]))
    return found[-1] if found else None  # (python3.X-venv is a symlink to python3.X's directory)


def ensure_package() -> Path:
    """The reST sources directory, installing python3-doc with apt-get when it is missing."""
    found = sources_dir()
    if found is None:
        log.info("installing %s (the corpus) with apt-get", PACKAGE)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", PACKAGE]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"`{' '.join(cmd)}` failed ({proc.stderr.strip()[-200:]}); install {PACKAGE} as root")
        found = sources_dir()
    if found is None:
        raise UserError(f"{PACKAGE} is installed but {SOURCES}/{SOURCES_GLOB} is missing")
    return found


def package_version(root: Path) -> str:
    package = root.parts[-3] + "-doc"  # /usr/share/doc/python3.11/html/_sources -> python3.11-doc
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return f"{package} {proc.stdout.strip() or 'unknown version'}"


def clean_rst(text: str) -> str:
    """reST source -> readable text: directives, labels, heading rules and role markup removed;
    prose, literal blocks and code kept as written."""
    out: list[str] = []
    dropping: int | None = None  # indentation of a directive whose body is being dropped
    in_directive_head = False
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if dropping is not None:
            if not line.strip() or indent > dropping:
                continue
            dropping = None
        m = _DIRECTIVE.match(line)
        if m:
            if (m.group(2) or "").strip() in _DROP_BODY:
                dropping = len(m.group(1))
            in_directive_head = True
            continue
        if in_directive_head and _OPTION.match(line):
            continue
        in_directive_head = False
        if _LABEL_OR_COMMENT.match(line) or _HEADING_RULE.match(line):
            continue
        line = _ROLE.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        line = _STRONG.sub(r"\1", line)
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def load_corpus(root: Path | None = None) -> Corpus:
    """Every .rst.txt under the package's _sources, cleaned; sorted by path, every 20th held out."""
    root = root or ensure_package()
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise UserError(f"no reST sources under {root}")
    docs = [clean_rst(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return Corpus(train=train, held_out=held, source=package_version(root))
