#!/usr/bin/env python3
"""Fetch the demo model's training text: Jane Austen's six novels (public domain).

Source: the Debian package ``r-cran-janeaustenr`` (CRAN package janeaustenr by Julia Silge, MIT
licence; the novels themselves are public domain, from Project Gutenberg). The package stores the
novels as an R lazy-load database (data/Rdata.rdx + data/Rdata.rdb); this script reads it with a
small R-serialization reader (no R needed), unwraps the Gutenberg line breaks into one paragraph
per line, strips the _italic_ markup, and writes

    CACHE/text/train.txt     first ~95% of the paragraphs of each novel
    CACHE/text/heldout.txt   last ~5% of the paragraphs of each novel (evaluation only)
    CACHE/text/SOURCE.txt    provenance, the package's copyright file and checksums

CACHE defaults to ~/.cache/edgellm-demo (override with --cache or EDGELLM_DEMO_CACHE).
Needs only ``apt-get download`` and ``dpkg-deb`` (run ``apt-get update`` first on a new machine).

    python scripts/get_demo_text.py
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
PKG_DIR = "usr/lib/R/site-library/janeaustenr"
# janeaustenr's own austen_books() order (publication order of the six finished novels)
NOVELS = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]
HELDOUT_FRACTION = 0.05


def default_cache() -> Path:
    return Path(os.environ.get("EDGELLM_DEMO_CACHE", Path.home() / ".cache" / "edgellm-demo"))


# ---------------------------------------------------------------- R serialization (XDR) reader
class _RReader:
    """Minimal reader for R's serialization format (XDR, versions 2 and 3).

    Covers what data packages hold: vectors, strings, pairlists, symbols, references,
    environments. Returns Python values: list for vectors, str/None for strings.
    """

    NILVALUE, REF, EMPTYENV, BASEENV, GLOBALENV, UNBOUND, MISSING, BASENS = (
        254, 255, 242, 241, 253, 252, 251, 247)

    def __init__(self, data: bytes):
        self.b = data
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def parse(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        self.p = 2
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.p += n
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t in (self.NILVALUE, self.EMPTYENV, self.BASEENV, self.GLOBALENV, self.UNBOUND,
                 self.MISSING, self.BASENS):
            return None
        if t == self.REF:
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self._item()
            self.refs.append(name)
            return name
        if t == 4:  # ENVSXP
            self._int()  # locked
            env: dict = {}
            self.refs.append(env)
            self._item()  # enclosure
            env["frame"] = self._item()
            env["hashtab"] = self._item()
            self._item()  # attributes
            return env
        if t in (2, 3, 5, 6, 17):  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP
            out = []
            while True:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else None
                out.append((tag, self._item()))
                flags = self._int()
                t = flags & 0xFF
                if t == self.NILVALUE:
                    return out
                if t not in (2, 3, 5, 6, 17):
                    self.p -= 4
                    out.append((None, self._item()))
                    return out
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n]
            self.p += n
            enc = "latin-1" if flags & (1 << 14) else "utf-8"  # LATIN1_MASK = 1 << 2 of levels
            return s.decode(enc, errors="replace")
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t == 16:  # STRSXP
            n = self._int()
            v = [self._item() for _ in range(n)]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            n = self._int()
            v = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R SEXP type {t} at byte {self.p - 4}")
        if has_attr:
            self._item()
        return v


def read_lazyload_db(rdx_path: Path, rdb_path: Path) -> dict:
    """Read every variable of an R lazy-load database (the .rdx index and the .rdb blobs)."""
    index_raw = gzip.decompress(rdx_path.read_bytes())
    # the index is a named list(variables=, references=, compressed=); names are an attribute,
    # so re-read with a reader that keeps attributes of the top-level vector
    rr = _RReaderWithNames(index_raw)
    index = rr.parse()
    variables = index["variables"]
    rdb = rdb_path.read_bytes()
    out = {}
    for name, (offset, length) in variables.items():
        blob = rdb[int(offset):int(offset) + int(length)]
        (ulen,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        if len(data) != ulen:
            raise ValueError(f"{rdb_path}: {name}: bad length")
        out[name] = _RReader(data).parse()
    return out


class _RReaderWithNames(_RReader):
    """Like _RReader, but a named VECSXP becomes a dict (for the lazy-load index)."""

    def _item(self):
        start = self.p
        flags = struct.unpack_from(">i", self.b, self.p)[0]
        t = flags & 0xFF
        if t == 19 and flags & (1 << 9):
            self.p += 4
            n = self._int()
            vals = [self._item() for _ in range(n)]
            attrs = self._item()
            names = dict(attrs).get("names") if attrs else None
            if names:
                return dict(zip(names, vals))
            return vals
        self.p = start
        return super()._item()


# ---------------------------------------------------------------- download and clean
def fetch_deb(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        for spec in (f"{DEB_PACKAGE}={DEB_VERSION}", DEB_PACKAGE):
            r = subprocess.run(["apt-get", "download", spec], cwd=work,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            print(f"apt-get download {spec} failed: {r.stderr.strip()}", file=sys.stderr)
        debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
        if not debs:
            sys.exit("could not download the package; run `apt-get update` and retry")
    deb = debs[-1]
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        print(f"warning: {deb.name} sha256 {digest} differs from the recorded {DEB_SHA256} "
              f"(version {DEB_VERSION}); the text may differ", file=sys.stderr)
    return deb


def clean_novel(lines: list[str]) -> list[str]:
    """Gutenberg lines -> paragraphs (one per string), markup stripped."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if not line:
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        paras.append(" ".join(cur))
    out = []
    for p in paras:
        p = p.replace("_", "")  # _italics_
        p = re.sub(r"\[(Illustration|Footnote)[^\]]*\]", "", p)
        p = p.replace("\u2019", "'").replace("\u2018", "'")
        p = p.replace("\u201c", '"').replace("\u201d", '"')
        p = re.sub(r"\s+", " ", p).strip()
        if p:
            out.append(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    args = ap.parse_args(argv)
    cache: Path = args.cache.expanduser()
    deb = fetch_deb(cache / "download")
    root = cache / "download" / "extracted"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    pkg = root / PKG_DIR
    objs = read_lazyload_db(pkg / "data" / "Rdata.rdx", pkg / "data" / "Rdata.rdb")

    train, held = [], []
    stats = []
    for var, title in NOVELS:
        paras = clean_novel(objs[var])
        cut = int(round(len(paras) * (1 - HELDOUT_FRACTION)))
        train.append("\n".join(paras[:cut]))
        held.append("\n".join(paras[cut:]))
        stats.append(f"{title}: {len(paras)} paragraphs, "
                     f"{sum(len(p.split()) for p in paras)} words, held out from paragraph {cut}")
    out = cache / "text"
    out.mkdir(parents=True, exist_ok=True)
    train_txt = "\n\n".join(train) + "\n"
    held_txt = "\n\n".join(held) + "\n"
    (out / "train.txt").write_text(train_txt, encoding="utf-8")
    (out / "heldout.txt").write_text(held_txt, encoding="utf-8")
    copyright_file = root / "usr/share/doc" / DEB_PACKAGE / "copyright"
    sha = lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest()  # noqa: E731
    source = [
        "Jane Austen's six finished novels (public domain; the texts come from Project Gutenberg).",
        f"Obtained from the Debian package {deb.name} (CRAN janeaustenr, MIT licence),",
        "read from its R lazy-load database by scripts/get_demo_text.py, paragraphs unwrapped,",
        f"_italic_ markup removed. Held out: the last {HELDOUT_FRACTION:.0%} of each novel's paragraphs.",
        "",
        *stats,
        "",
        f"train.txt   {len(train_txt)} chars  sha256 {sha(train_txt)}",
        f"heldout.txt {len(held_txt)} chars  sha256 {sha(held_txt)}",
        "",
        "---- package copyright file ----",
        copyright_file.read_text(encoding="utf-8") if copyright_file.exists() else "(missing)",
    ]
    (out / "SOURCE.txt").write_text("\n".join(source), encoding="utf-8")
    print("\n".join(source[:14]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
