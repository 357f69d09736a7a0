"""Deployment packages: choose the files (skipping .git and what .gitignore excludes),
write a deterministic tarball, and name it by a hash of its content.

A package is a folder holding an executable ``vtool-launch`` (or vcloud's
``vcloud-launch``), or a ``.tar.gz``/``.tgz``/``.tar.bz2`` of one such folder (what
``mkpkg`` writes, or one made by hand with ``tar czf NAME.tar.gz NAME/``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ConfigError
from .models import Release

LAUNCHERS = ("vtool-launch", "vcloud-launch")
ARCHIVE_SUFFIXES = {".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,100}$")


@dataclass(frozen=True)
class Entry:
    path: str  # posix path relative to the package folder
    kind: str  # "file" | "dir" | "link"
    executable: bool = False
    target: str = ""  # for links


def check_name(name: str, source: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{source}: package name {name!r} must start with a letter, digit or '_' and use only "
            "letters, digits and . _ + -"
        )
    return name


class _Ignore:
    """The subset of .gitignore rules that matter for packages: globs, '**', '!' negation,
    trailing '/' (folders only) and leading '/' (anchored), per folder."""

    def __init__(self) -> None:
        self.rules: list[tuple[str, str, bool, bool, bool]] = []  # (base, pattern, negate, dir_only, anchored)

    def add_file(self, base: str, path: Path) -> None:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return
        for raw in text.splitlines():
            line = raw.rstrip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:]
            line = line.replace("\\#", "#").replace("\\!", "!")
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            anchored = "/" in line
            line = line.lstrip("/")
            if line:
                self.rules.append((base, line, negate, dir_only, anchored))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        result = False
        for base, pattern, negate, dir_only, anchored in self.rules:
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1 :] if base else rel
            if dir_only and not is_dir:
                continue
            if anchored:
                hit = _glob_match(sub, pattern)
            else:
                hit = fnmatch.fnmatchcase(PurePosixPath(sub).name, pattern)
            if hit:
                result = not negate
        return result


def _glob_match(path: str, pattern: str) -> bool:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            regex += "/.*"
            i += 3
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return re.fullmatch(regex, path) is not None


def select_files(root: Path) -> list[Entry]:
    """Every entry of the package folder that is shipped, sorted, .git and ignored ones left out."""
    ignore = _Ignore()
    entries: list[Entry] = []

    def walk(d: Path, rel: str) -> None:
        if (d / ".gitignore").is_file():
            ignore.add_file(rel, d / ".gitignore")
        for child in sorted(d.iterdir(), key=lambda p: p.name):
            crel = f"{rel}/{child.name}" if rel else child.name
            if child.name == ".git":
                continue
            st = child.lstat()
            is_dir = stat.S_ISDIR(st.st_mode)
            if ignore.ignored(crel, is_dir):
                continue
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(crel, "link", target=os.readlink(child)))
            elif is_dir:
                entries.append(Entry(crel, "dir"))
                walk(child, crel)
            elif stat.S_ISREG(st.st_mode):
                entries.append(Entry(crel, "file", executable=bool(st.st_mode & 0o111)))
            # sockets, fifos and devices are never shipped

    walk(root, "")
    return entries


def find_launcher(root: Path) -> str:
    """The launch script's name, or a ConfigError saying what is wrong."""
    for name in LAUNCHERS:
        p = root / name
        if p.is_file():
            if not os.access(p, os.X_OK):
                raise ConfigError(f"{p} is not executable: run `chmod +x {p}`")
            return name
    raise ConfigError(f"{root} has no launch script: add an executable file named vtool-launch (or vcloud-launch)")


def _check_shipped(root: Path, entries: list[Entry], launcher: str) -> None:
    """The launch script must be shipped, as a regular executable file."""
    entry = next((e for e in entries if e.path == launcher), None)
    if entry is None:
        raise ConfigError(f"{root / launcher} is excluded by a .gitignore: it would not reach the nodes")
    if entry.kind != "file" or not entry.executable:
        raise ConfigError(f"{root / launcher} must be a regular executable file, not a {entry.kind}")


def file_digests(root: Path, entries: list[Entry]) -> dict[str, str]:
    """sha256 (hex) of every shipped file's bytes, by path."""
    out: dict[str, str] = {}
    for e in entries:
        if e.kind == "file":
            fh = hashlib.sha256()
            with open(root / e.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    fh.update(chunk)
            out[e.path] = fh.hexdigest()
    return out


def content_hash(root: Path, entries: list[Entry], digests: dict[str, str] | None = None) -> str:
    """sha256 over (kind, path, executable bit, link target, file bytes): mtimes and owners
    do not change it, so an unchanged package is recognised on the nodes."""
    digests = file_digests(root, entries) if digests is None else digests
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.kind}\0{e.path}\0{int(e.executable)}\0{e.target}\0".encode())
        if e.kind == "file":
            h.update(bytes.fromhex(digests[e.path]))
    return h.hexdigest()


def manifest_path(archive: str | Path) -> Path:
    """Where the manifest of a release built from a folder is kept (next to its archive)."""
    p = Path(archive)
    return p.with_name(re.sub(r"(\.tar(\.gz|\.bz2)?|\.tgz)$", "", p.name) + ".manifest.json")


def load_manifest(archive: str | Path) -> dict[str, dict[str, object]] | None:
    """path -> {kind, x, target, sha} for a release vtool packed from a folder, else None."""
    try:
        data = json.loads(manifest_path(archive).read_text())
        return {str(k): dict(v) for k, v in data["entries"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_manifest(archive: Path, entries: list[Entry], digests: dict[str, str]) -> None:
    data = {
        "entries": {
            e.path: {"kind": e.kind, "x": e.executable, "target": e.target, "sha": digests.get(e.path, "")}
            for e in entries
        }
    }
    _write_note(manifest_path(archive), json.dumps(data, sort_keys=True))


def _write_note(dest: Path, text: str) -> None:
    tmp_fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")  # (0600)
    try:
        with os.fdopen(tmp_fd, "w") as f:
            f.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _size_note(archive: Path) -> Path:
    return archive.with_name(re.sub(r"\.tar(\.gz|\.bz2)?$", "", archive.name) + ".tar-size")


def plain_size(release: Release) -> int:
    """The size of the release's archive decompressed: the plain tar that the nodes keep
    (they pass that on among themselves, so that only the first one decompresses). Noted
    next to the archive in the store when vtool packs it; counted once (by decompressing)
    for an archive the user packed."""
    archive = Path(release.archive)
    if release.compression == "none":
        return archive.stat().st_size
    note = _size_note(archive)
    try:
        return int(note.read_text())
    except (OSError, ValueError):
        pass
    size = _count_plain(archive, release.compression)
    _write_note(note, str(size))
    return size


def _count_plain(archive: Path, compression: str) -> int:
    """Decompress ``archive`` to count its bytes (which checks it whole: gzip's CRC and
    length, bzip2's CRCs); a damaged archive is a ConfigError."""
    return sum(len(chunk) for chunk in _plain_chunks(archive, compression))


def _plain_chunks(archive: Path, compression: str) -> Iterator[bytes]:
    """The gzip or bzip2 ``archive`` decompressed, 1 MB at a time; ConfigError if damaged."""
    import bz2  # (rare: only here)

    try:
        with (gzip.open if compression == "gz" else bz2.open)(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
    except (OSError, EOFError, ValueError, zlib.error) as e:  # (gzip.BadGzipFile is an OSError)
        raise ConfigError(f"{archive}: the package archive is damaged ({e})") from None


def zstd_path(release: Release) -> Path:
    """Where the zstd copy of the release's archive is kept (see ``zstd_archive``)."""
    return Path(release.archive).with_name(release.payload(zstd=True))


def zstd_archive(release: Release) -> Path | None:
    """The release's archive recompressed with zstd (level 3), made once into the store next
    to it: smaller than gzip -1 (3.7 MB against 4.8 MB for the bench's source tree) and ~5x
    faster to unpack (15 ms against 71 ms). None when this machine has no ``zstd``, when the
    package is a plain tar (incompressible), or when the archive does not decompress (the
    nodes then get it as it is and report it)."""
    import subprocess

    if release.compression == "none":
        return None
    dest = zstd_path(release)
    if dest.exists():
        return dest
    program = shutil.which("zstd")
    if program is None:
        return None
    archive = Path(release.archive)
    tmp_fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(tmp_fd)
    try:
        with subprocess.Popen(
            [program, "-q", "-3", "-T0", "-f", "-o", tmp], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL
        ) as zstd:
            assert zstd.stdin is not None
            try:
                for chunk in _plain_chunks(archive, release.compression):
                    zstd.stdin.write(chunk)
            finally:
                zstd.stdin.close()
        if zstd.returncode != 0:
            raise OSError(f"zstd exited {zstd.returncode}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        return dest
    except (OSError, ConfigError):
        Path(tmp).unlink(missing_ok=True)
        return None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_delta(new: Release, base: str) -> Path | None:
    """A gzip tarball that turns ``base``'s release folder into ``new``'s: the files that
    differ (under ``NAME/``), plus ``.vtool-keep`` (the paths, relative to the release
    folder, to copy from the base, NUL separated) and ``.vtool-sums`` (their sha256, checked on the node before copying, so a
    base changed on the node is never silently reused). ``base`` is the base's release
    folder name (``NAME-HASH12``). None when vtool did not pack both from folders (an
    archive given by the user has no manifest). Folders and links are always in the delta."""
    store = Path(new.archive).parent
    new_m, base_m = load_manifest(new.archive), load_manifest(store / f"{base}.tar")
    if new_m is None or base_m is None or not base.startswith(f"{new.name}-"):
        return None
    dest = store / f"{new.dirname}.from-{base}.tar.gz"
    if dest.exists():
        return dest
    changed: list[str] = []
    keep: list[str] = []
    for path, e in new_m.items():
        b = base_m.get(path)
        same = b is not None and b["kind"] == "file" and b["sha"] == e["sha"] and b["x"] == e["x"]
        # (a name sha256sum would have to escape is simply sent again)
        if e["kind"] == "file" and same and "\n" not in path and "\\" not in path:
            keep.append(path)
        else:
            changed.append(path)
    wanted = {new.name} | {f"{new.name}/{p}" for p in changed}
    with tarfile.open(new.archive, "r:*") as src:
        tmp_fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(tmp_fd)
        try:
            with (
                open(tmp, "wb") as raw,
                gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as out,
            ):
                for name, text in (
                    (".vtool-keep", "".join(f"{p}\0" for p in keep)),
                    (".vtool-sums", "".join(f"{new_m[p]['sha']}  {p}\n" for p in keep)),
                ):
                    data = text.encode()
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o644
                    out.addfile(info, io.BytesIO(data))
                for m in src:  # one pass, in the archive's order
                    if m.name not in wanted:
                        continue
                    if m.isfile():
                        out.addfile(m, src.extractfile(m))
                    else:
                        out.addfile(m)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


class _Counted:
    """A write-only file that counts what passes through it (tarfile needs write and tell)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.count = inner, 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return int(self.inner.write(data))

    def tell(self) -> int:
        return self.count


def write_tarball(root: Path, name: str, entries: list[Entry], dest: Path, level: int | None = 1) -> int:
    """A tarball of ``entries`` under the folder ``name/``, owners and modes normalised:
    gzip at ``level``, or plain with ``level=None``. Returns the size of the plain tar."""
    tmp_fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(tmp_fd)
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(open(tmp, "wb"))
            sink: Any = raw
            if level is not None:
                sink = stack.enter_context(
                    gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=level, mtime=0)
                )
            counted = _Counted(sink)
            tar = stack.enter_context(tarfile.open(fileobj=counted, mode="w", format=tarfile.PAX_FORMAT))  # type: ignore[call-overload]
            top = tarfile.TarInfo(name)
            top.type, top.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(top)
            for e in entries:
                src = root / e.path
                info = tarfile.TarInfo(f"{name}/{e.path}")
                st = src.lstat()
                info.mtime = int(st.st_mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if e.kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif e.kind == "link":
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.target, 0o777
                    tar.addfile(info)
                else:
                    info.mode = 0o755 if e.executable else 0o644
                    info.size = st.st_size
                    with open(src, "rb") as f:
                        tar.addfile(info, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        return counted.count
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_member_name(name: str, source: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ConfigError(f"{source}: unsafe path {name!r} in the archive")
    return p


def inspect_archive(path: Path) -> tuple[str, str]:
    """Check a package archive; return (package name, launcher name)."""
    comp = next((c for s, c in ARCHIVE_SUFFIXES.items() if path.name.endswith(s)), None)
    if comp is None:
        raise ConfigError(f"{path}: a package is a folder or a .tar.gz, .tgz or .tar.bz2 file")
    tops: set[str] = set()
    members: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(path, "r:gz" if comp == "gz" else "r:bz2") as tar:
            for m in tar:
                p = _check_member_name(m.name, str(path))
                tops.add(p.parts[0])
                members[str(p)] = m
                if not (m.isfile() or m.isdir() or m.issym()):
                    raise ConfigError(f"{path}: {m.name!r} is neither a file, a folder nor a symlink")
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise ConfigError(f"{path}: not a readable package archive ({e})") from None
    if len(tops) != 1:
        raise ConfigError(
            f"{path}: the archive must hold exactly one top folder (found {', '.join(sorted(tops)) or 'nothing'})"
        )
    name = check_name(tops.pop(), str(path))
    for launcher in LAUNCHERS:
        entry = members.get(f"{name}/{launcher}")
        if entry is not None and entry.isfile():
            if not entry.mode & 0o100:
                raise ConfigError(f"{path}: {name}/{launcher} is not executable (chmod +x it before packing)")
            return name, launcher
    raise ConfigError(f"{path}: no executable {name}/vtool-launch (or vcloud-launch) in the archive")


def build_release(source: str | Path, store: Path) -> Release:
    """Validate ``source`` (folder or archive) and make sure its archive is in ``store``.

    Nothing is sent anywhere; an invalid package raises ConfigError before any node is touched.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise ConfigError(f"{source}: no such folder or file")
    if src.is_dir():
        launcher = find_launcher(src)
        name = check_name(src.resolve().name, str(source))
        entries = select_files(src)
        _check_shipped(src, entries, launcher)
        digests = file_digests(src, entries)
        digest = content_hash(src, entries, digests)
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        # gzip (level 1: fast to pack and to unpack) unless it saves little: incompressible
        # content (data, binaries) goes as a plain tar, which the nodes unpack ~10x faster.
        dest = store / f"{name}-{digest[:12]}.tar.gz"
        plain = dest.with_name(f"{name}-{digest[:12]}.tar")
        if plain.exists():
            dest = plain
        elif not dest.exists():
            size = write_tarball(src, name, entries, dest)
            if dest.stat().st_size > 0.9 * size:
                write_tarball(src, name, entries, plain, level=None)
                dest.unlink()
                dest = plain
            else:
                _write_note(_size_note(dest), str(size))
        os.utime(dest)  # the newest release is the last one used (the store keeps a few)
        if not manifest_path(dest).exists():
            _write_manifest(dest, entries, digests)
        comp = "none" if dest == plain else "gz"
        return Release(name=name, hash=digest, compression=comp, archive=str(dest), launcher=launcher)
    name, launcher = inspect_archive(src)
    comp = next(c for s, c in ARCHIVE_SUFFIXES.items() if src.name.endswith(s))
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    dest = store / f"{name}-{digest[:12]}.tar.{comp}"
    if not dest.exists():
        size = _count_plain(src, comp)  # (tar stops reading at its end marker: the checksum is after it)
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        _write_note(_size_note(dest), str(size))
    else:
        os.utime(dest)
    return Release(name=name, hash=digest, compression=comp, archive=str(dest), launcher=launcher)


def prune_store(store: Path, name: str, keep: int = 4, also: tuple[str, ...] = ()) -> list[str]:
    """Forget all but the ``keep`` newest releases of package ``name`` in the store (and
    those named in ``also``: release folder names): archives, manifests, checksums, deltas.
    Returns the release folder names removed. Releases on the nodes are not touched."""
    pattern = re.compile(rf"^({re.escape(name)}-[0-9a-f]{{12}})\.")
    groups: dict[str, list[Path]] = {}
    try:
        entries = list(store.iterdir())
    except OSError:
        return []
    for p in entries:
        m = pattern.match(p.name)
        if m:
            groups.setdefault(m.group(1), []).append(p)

    def age(dirname: str) -> float:
        return max((p.stat().st_mtime for p in groups[dirname] if p.exists()), default=0.0)

    ordered = sorted(groups, key=age, reverse=True)
    gone = [d for d in ordered[keep:] if d not in also]
    for d in gone:
        for p in groups[d]:
            p.unlink(missing_ok=True)
    return gone


def make_package(folder: str | Path, output: str | Path | None = None) -> Path:
    """``mkpkg``: write ``NAME.tar.gz`` (the archive ``inject`` would send) and return its path."""
    src = Path(folder).expanduser()
    if not src.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    launcher = find_launcher(src)
    name = check_name(src.resolve().name, str(folder))
    dest = Path(output).expanduser() if output else Path.cwd() / f"{name}.tar.gz"
    if dest.is_dir() or str(output or "").endswith("/"):
        dest = dest / f"{name}.tar.gz"
    if not dest.name.endswith((".tar.gz", ".tgz")):
        raise ConfigError(f"{dest}: mkpkg writes a gzip tarball; name it NAME.tar.gz or NAME.tgz")
    if dest.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"{dest}: write the package outside the folder it packs")
    dest.parent.mkdir(parents=True, exist_ok=True)
    entries = select_files(src)
    _check_shipped(src, entries, launcher)
    write_tarball(src, name, entries, dest, level=6)
    os.chmod(dest, 0o644)
    return dest
