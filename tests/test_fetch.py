"""Fetching from nodes can never write outside the destination, whatever a node sends."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import Env

from vtool.errors import NodeError
from vtool.fetch import extract_stream


def _tar(entries: list[tuple[str, str, bytes | str]]) -> io.BytesIO:
    """entries: (name, kind, data-or-linkname); kind in file|dir|sym|hard|fifo|suid."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind in ("file", "suid"):
                raw = data if isinstance(data, bytes) else data.encode()
                info.size = len(raw)
                info.mode = 0o6755 if kind == "suid" else 0o644
                tar.addfile(info, io.BytesIO(raw))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.mode = 0o755
            if kind in ("sym", "hard"):
                info.linkname = str(data)
            tar.addfile(info)
    buf.seek(0)
    return buf


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_names_and_links_stay_inside(tmp_path: Path) -> None:
    dest_parent = tmp_path / "dest"
    dest_parent.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    stream = _tar([
        ("results", "dir", ""),
        ("results/ok.txt", "file", "fine"),
        ("results/../../escape.txt", "file", "no"),
        ("/etc/vtool-absolute.txt", "file", "no"),
        ("results/sub/../../../escape2.txt", "file", "no"),
        ("other-top/x.txt", "file", "no"),
        ("results/link", "sym", str(outside)),
        ("results/link/through.txt", "file", "no"),
        ("results/hard", "hard", "/etc/passwd"),
        ("results/fifo", "fifo", ""),
        ("results/setuid-tool", "suid", "#!/bin/sh\n"),
        ("results/-rf", "file", "dash"),
        ("results/new\nline", "file", "nl"),
        ("results/deep/er/file.txt", "file", "deep"),
    ])
    report = extract_stream(stream, dest_parent / "r.0", recursive=True)
    got = dest_parent / "r.0"
    assert (got / "ok.txt").read_text() == "fine"
    assert (got / "-rf").read_text() == "dash"
    assert (got / "new\nline").read_text() == "nl"
    assert (got / "deep" / "er" / "file.txt").read_text() == "deep"
    mode = stat.S_IMODE((got / "setuid-tool").stat().st_mode)
    assert mode == 0o755  # setuid/setgid dropped
    assert not (got / "hard").exists() and not (got / "fifo").exists()
    # The symlink was not created; the file "through" it became a plain folder inside.
    assert not (got / "link").is_symlink() and (got / "link" / "through.txt").read_text() == "no"
    assert list(outside.iterdir()) == []
    assert _tree(tmp_path) == {"dest", "outside"} | {f"dest/{p}" for p in _tree(dest_parent)}
    assert all(p.startswith("r.0") for p in _tree(dest_parent))
    assert not Path("/etc/vtool-absolute.txt").exists()
    skipped = "\n".join(report.skipped)
    for word in ("escape.txt", "vtool-absolute", "escape2", "other-top", "'link' (symlink)", "hard link", "special file"):
        assert word in skipped, word
    assert report.files == 6


def test_existing_symlink_in_destination_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "r.0"
    dest.mkdir()
    (dest / "sub").symlink_to(victim)  # planted earlier (e.g. by a previous hostile fetch)
    (dest / "file.txt").symlink_to(victim / "target.txt")
    stream = _tar([("res", "dir", ""), ("res/sub", "dir", ""), ("res/sub/x.txt", "file", "x"), ("res/file.txt", "file", "y")])
    report = extract_stream(stream, dest, recursive=True)
    assert list(victim.iterdir()) == []
    assert (dest / "file.txt").read_text() == "y" and not (dest / "file.txt").is_symlink()  # replaced, not followed
    assert any("sub" in s for s in report.skipped)


def test_truncated_stream_leaves_no_partial_file(tmp_path: Path) -> None:
    raw = _tar([("big.bin", "file", b"z" * 100_000)]).getvalue()
    with pytest.raises(NodeError, match="broke off|received"):
        extract_stream(io.BytesIO(raw[:30_000]), tmp_path / "big.bin.0", recursive=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NodeError, match="sent nothing"):
        extract_stream(io.BytesIO(b""), tmp_path / "x", recursive=False)


def test_scpgetall_r_with_hostile_files_on_real_nodes(cluster3: Env) -> None:
    """Real nodes holding symlinks out of their home, odd names and a planted link."""
    victim = cluster3.root / "victim"
    victim.mkdir()
    setup = (
        "mkdir -p res/sub && echo data-$VTOOL_NODE_INDEX > res/sub/data.txt && "
        f"ln -s {victim} res/out && ln -s /etc/passwd res/passwd && ln -s ../../.. res/up && "
        "echo dash > ./res/-n && printf x > 'res/with space' && mkfifo res/pipe"
    )
    cluster3.ok("run", setup)
    r = cluster3.ok("scpgetall", "res", "got", "-r")
    for i in range(3):
        d = cluster3.work / f"got.{i}"
        assert (d / "sub" / "data.txt").read_text() == f"data-{i}\n"
        assert (d / "-n").read_text() == "dash\n" and (d / "with space").read_text() == "x"
        assert not any(p.is_symlink() for p in d.rglob("*"))
    assert list(victim.iterdir()) == []
    assert "skipped 'out' (symlink)" in r.stderr and "skipped 'pipe' (special file)" in r.stderr


def test_hostile_node_sending_a_crafted_stream(cluster3: Env) -> None:
    """Node 1 is compromised: whatever it is asked, it answers with a crafted tar stream."""
    crafted = cluster3.root / "crafted.tar"
    crafted.write_bytes(_tar([
        ("res", "dir", ""), ("res/../../../../pwned.txt", "file", "x"), ("/tmp/vtool-pwned.txt", "file", "x"),
        ("res/link", "sym", "/"), ("res/link/etc/pwned", "file", "x"), ("res/fine.txt", "file", "ok"),
    ]).getvalue())
    shell = cluster3.vhome / "clusters" / "default" / "nodes" / "1" / "shell"
    shell.write_text(f"#!/bin/sh\ncase \"$SSH_ORIGINAL_COMMAND\" in *tar*) exec cat {crafted};; esac\n"
                     "cd \"$HOME\"; exec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n")
    cluster3.ok("run", "mkdir -p res")
    r = cluster3.ok("scpgetall", "res", "got", "-r", "--nodes", "1")
    assert (cluster3.work / "got.1" / "fine.txt").read_text() == "ok"
    assert not (cluster3.root / "pwned.txt").exists() and not Path("/tmp/vtool-pwned.txt").exists()
    assert sorted(os.listdir(cluster3.work)) == ["got.1"]
    assert "unsafe name" in r.stderr and "(symlink)" in r.stderr


def test_a_node_that_sends_nothing_is_heard_out(cluster3: Env) -> None:
    """A node that says why it sends nothing and closes its output before its exit status
    arrives (as the fetch script's end can, for a folder without -r or a missing file) is
    waited for: its reason reaches the user, not "sent nothing" (killing its client, as for a
    broken stream, lost the exit status: a CI run failed so)."""
    shell = cluster3.vhome / "clusters" / "default" / "nodes" / "0" / "shell"
    shell.write_text("#!/bin/sh\ncase \"$SSH_ORIGINAL_COMMAND\" in *tar*)\n"
                     "  echo \"inputs is a folder: use -r\" >&2; exec <&- >&- 2>&-; sleep 1; exit 45;; esac\n"
                     "cd \"$HOME\"; exec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n")
    r = cluster3.cli("scpget", "inputs", "x")
    assert r.returncode == 1 and "inputs is a folder: use -r" in r.stderr, r.stderr
    assert not (cluster3.work / "x").exists()
