"""Write files a node sends (a tar stream) into a local destination, safely.

A node is not trusted: whatever names, ``..`` entries, absolute paths or symlinks its
stream holds, nothing is written outside the destination. Rules:

* the destination's name comes from vtool (the user's argument and the node index), never
  from the node; the stream's top entry name is ignored;
* every entry name is checked (no absolute path, no ``..``), and folders are walked with
  ``O_NOFOLLOW`` from the destination, so a symlink is never followed on write;
* symlinks, hard links, devices and fifos are not created: they are skipped and reported;
* each file is written to a temporary name in its folder, its size checked, then renamed;
  setuid, setgid and sticky bits are dropped.
"""

from __future__ import annotations

import os
import secrets
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from .errors import NodeError
from .models import FetchReport

_CHUNK = 1 << 20


class _Writer:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.files = 0
        self.bytes = 0
        self.skipped: list[str] = []
        self._dirs: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _dir_fd(self, parts: tuple[str, ...], create: bool = True) -> int:
        """An fd for dest/parts..., creating folders, never following a symlink."""
        if parts in self._dirs:
            return self._dirs[parts]
        if len(self._dirs) >= 64:  # a deep or wide tree must not exhaust the open-file limit
            self.close()
        if not parts:
            self.dest.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY)
        else:
            parent = self._dir_fd(parts[:-1], create)  # opened last, so never closed by the cap here
            name = parts[-1]
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=parent)
                except FileExistsError:
                    pass
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        self._dirs[parts] = fd
        return fd

    def write_file(self, parts: tuple[str, ...], member: tarfile.TarInfo, data: IO[bytes]) -> None:
        *folder, name = parts
        pfd = self._dir_fd(tuple(folder))
        tmp = f".vtool-tmp-{secrets.token_hex(6)}-{name[:40]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: data.read(_CHUNK), b""):
                    out.write(chunk)
                    written += len(chunk)
                if written != member.size:
                    raise NodeError(f"{'/'.join(parts) or name}: received {written} of {member.size} bytes")
                os.fchmod(out.fileno(), member.mode & 0o777)
            os.utime(tmp, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)
            os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=pfd)
            except FileNotFoundError:
                pass
            raise
        self.files += 1
        self.bytes += written


def _parts(name: str) -> tuple[str, ...] | None:
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        return None
    return tuple(part for part in p.parts if part != ".")


class NothingSent(NodeError):
    """The node's stream ended before any entry: it closed its output, and its exit status
    (which the caller then waits for) says why."""


def extract_stream(stream: IO[bytes], dest: Path, *, recursive: bool) -> FetchReport:
    """Read a tar stream whose first entry is the fetched file or folder and write it to ``dest``.

    ``dest`` is the final path of that file or folder. Raises NodeError if the stream is
    broken or empty; hostile or unsupported entries are skipped and listed in the report.
    """
    writer: _Writer | None = None
    single = Path(dest)
    root: str | None = None
    skipped: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_CHUNK) as tar:
            for member in tar:
                parts = _parts(member.name)
                if parts is None or not parts:
                    skipped.append(f"{member.name!r} (unsafe name)")
                    continue
                if root is None:
                    root = parts[0]
                    if member.isfile() and len(parts) == 1:
                        single.parent.mkdir(parents=True, exist_ok=True)
                        writer = _Writer(single.parent)
                        writer.write_file((single.name,), member, tar.extractfile(member))  # type: ignore[arg-type]
                        break
                    if not member.isdir() or len(parts) != 1:
                        raise NodeError(f"unexpected first entry {member.name!r} in the node's stream")
                    if not recursive:
                        raise NodeError(f"{member.name} is a folder: use -r to fetch folders")
                    writer = _Writer(single)
                    writer._dir_fd(())
                    continue
                if parts[0] != root:
                    skipped.append(f"{member.name!r} (outside the fetched folder)")
                    continue
                rel = parts[1:]
                if not rel:
                    continue
                assert writer is not None
                try:
                    if member.isdir():
                        writer._dir_fd(rel)
                    elif member.isfile():
                        writer.write_file(rel, member, tar.extractfile(member))  # type: ignore[arg-type]
                    else:
                        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                        skipped.append(f"{'/'.join(rel)!r} ({kind})")
                except (NotADirectoryError, IsADirectoryError, FileExistsError, OSError) as e:
                    if isinstance(e, OSError) and e.errno not in (20, 21, 17, 40):  # ENOTDIR EISDIR EEXIST ELOOP
                        raise
                    skipped.append(f"{'/'.join(rel)!r} (would write through a symlink or over a folder)")
    except tarfile.ReadError as e:
        if root is None:
            if str(e) == "empty file":
                raise NothingSent("the node sent nothing (no such file?)") from None
            raise NodeError("the node sent nothing (no such file?)") from None  # (not a tar stream)
        raise NodeError(f"the node's stream broke off ({e})") from None
    except (tarfile.TarError, EOFError) as e:
        raise NodeError(f"the node's stream broke off ({e})") from None
    finally:
        if writer is not None:
            writer.close()
    if root is None:
        raise NothingSent("the node sent nothing (no such file?)")
    return FetchReport(
        path=str(dest),
        files=writer.files if writer else 0,
        bytes=writer.bytes if writer else 0,
        skipped=tuple(skipped),
    )
