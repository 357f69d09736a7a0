"""Packages: file selection, a content hash that ignores mtimes, deterministic archives."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from conftest import make_package

from vtool import package
from vtool.errors import ConfigError
from vtool.package import build_release, content_hash, select_files
from vtool.package import make_package as mkpkg


def test_hash_depends_on_content_and_modes_not_mtimes(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, "p", "#!/bin/sh\n", {"a.txt": "1", "d/b.txt": "2"})
    h1 = content_hash(pkg, select_files(pkg))
    os.utime(pkg / "a.txt", (1, 1))
    assert content_hash(pkg, select_files(pkg)) == h1
    (pkg / "a.txt").chmod(0o755)
    h2 = content_hash(pkg, select_files(pkg))
    assert h2 != h1
    (pkg / "d" / "b.txt").write_text("3")
    assert content_hash(pkg, select_files(pkg)) not in (h1, h2)


def test_release_archive_is_reused_and_complete(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, "p", "#!/bin/sh\n", {"a.txt": "1", ".gitignore": "*.log\n", "x.log": "no"})
    (pkg / "link").symlink_to("a.txt")
    store = tmp_path / "store"
    r1 = build_release(pkg, store)
    r2 = build_release(pkg, store)
    assert r1 == r2 and r1.launcher == "vtool-launch" and r1.compression == "gz"
    with tarfile.open(r1.archive) as tar:
        names = sorted(tar.getnames())
        assert tar.getmember("p/vtool-launch").mode == 0o755 and tar.getmember("p/a.txt").uid == 0
        assert tar.getmember("p/link").issym()
    assert names == ["p", "p/.gitignore", "p/a.txt", "p/link", "p/vtool-launch"]


def test_mkpkg_is_deterministic_and_refuses_to_pack_itself(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, "p", "#!/bin/sh\n", {"a.txt": "1"})
    a = mkpkg(pkg, tmp_path / "one.tar.gz")
    b = mkpkg(pkg, tmp_path / "two.tar.gz")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ConfigError, match="outside the folder"):
        mkpkg(pkg, pkg / "p.tar.gz")
    out_dir = tmp_path / "dist"
    out_dir.mkdir()
    assert mkpkg(pkg, out_dir) == out_dir / "p.tar.gz"


def test_archive_checks(tmp_path: Path) -> None:
    two = tmp_path / "two.tar.gz"
    with tarfile.open(two, "w:gz") as tar:
        for name in ("a", "b"):
            info = tarfile.TarInfo(f"{name}/vtool-launch")
            info.mode = 0o755
            tar.addfile(info)
    with pytest.raises(ConfigError, match="exactly one top folder"):
        build_release(two, tmp_path / "s")
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("p/../../x"))
    with pytest.raises(ConfigError, match="unsafe path"):
        build_release(evil, tmp_path / "s")
    bad = tmp_path / "bad name!"
    bad.mkdir()
    (bad / "vtool-launch").write_text("#!/bin/sh\n")
    (bad / "vtool-launch").chmod(0o755)
    with pytest.raises(ConfigError, match="package name"):
        build_release(bad, tmp_path / "s")


def test_the_store_keeps_a_few_releases_per_package(tmp_path: Path) -> None:
    import time

    src = tmp_path / "proj"
    src.mkdir()
    (src / "vtool-launch").write_text("#!/bin/sh\n")
    (src / "vtool-launch").chmod(0o755)
    store = tmp_path / "store"
    made = []
    for i in range(7):
        (src / "v.txt").write_text(str(i) * 5000)
        rel = package.build_release(src, store)
        if made:
            assert package.write_delta(rel, made[-1].dirname) is not None
        os.utime(rel.archive, (time.time() - 100 + i, time.time() - 100 + i))  # distinct ages, oldest first
        made.append(rel)
    other = package.build_release(make_package(tmp_path, "other", "#!/bin/sh\n"), store)
    gone = package.prune_store(store, "proj", keep=4, also=(made[0].dirname,))
    assert sorted(gone) == sorted(r.dirname for r in made[1:3])
    left = {p.name.split(".")[0] for p in store.iterdir()}
    assert left == {r.dirname for r in [made[0], *made[3:]]} | {other.dirname}
    assert Path(other.archive).exists()
    assert package.load_manifest(made[-1].archive) is not None


def test_incompressible_content_is_packed_as_a_plain_tar(tmp_path: Path) -> None:
    """gzip only where it pays: the nodes unpack a plain tar far faster."""
    data = make_package(tmp_path, "data", "#!/bin/sh\n")
    (data / "blob.bin").write_bytes(os.urandom(300_000))
    text = make_package(tmp_path, "text", "#!/bin/sh\n", {f"m{i}.py": "x = 1\n" * 500 for i in range(20)})
    store = tmp_path / "store"
    r1, r2 = build_release(data, store), build_release(text, store)
    assert (r1.compression, r2.compression) == ("none", "gz")
    assert r1.archive.endswith(".tar") and r2.archive.endswith(".tar.gz")
    with tarfile.open(r1.archive, "r:") as tar:
        assert tar.extractfile("data/blob.bin").read() == (data / "blob.bin").read_bytes()  # type: ignore[union-attr]
    assert build_release(data, store) == r1  # found again, not packed again
    assert package.load_manifest(r1.archive) is not None
