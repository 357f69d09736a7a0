"""The shell commands vtool runs on nodes (POSIX sh + GNU coreutils/tar), built with every
argument quoted. Pure functions: nothing here connects anywhere.

On each node vtool keeps::

    ~/.vtool/cluster.env        VTOOL_* variables (sourced by the launch wrapper)
    ~/.vtool/hosts              every node's address, in index order
    ~/.vtool/other_hosts        the same without this node (as vcloud's file)
    ~/.vtool/nodes              "INDEX NAME ADDRESS PORT" per node
    ~/.vtool/releases/NAME-HASH one folder per release (never changed once unpacked)
    ~/.vtool/packages/          the last package (or delta) received, passed on to other nodes
    ~/.vtool/ssh_config         "ssh -F ~/.vtool/ssh_config CLUSTER-3" reaches node 3
    ~/.vtool/relay_key          the cluster's internal key (its .pub is in ~/.ssh/authorized_keys)
    ~/.vtool/known_hosts        every node's pinned host key
    ~/.vtool/cm/NAME            a shared connection to node NAME (opened by prepare's ``warm``)
    ~/.vtool/bin/               vtool-run (runs a launch command), vtool-fan (FAN below)
    ~/.vtool/.prepared          a digest of what prepare wrote last (see prepare)
    ~/NAME -> releases/NAME-HASH   switched atomically by each inject
    ~/.vtool/runs/STAMP/        one folder per start: command, pid, log, exit, release
    ~/.vtool/current -> runs/STAMP
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .models import Node, Release
from .ssh import PGID_MARK, Supervision, q

# Runs the launch command of one start, recording pid, output and exit code.
RUN_WRAPPER = r"""#!/bin/sh
# written by vtool: runs a release's launch command and records pid, output and exit code
run=$1
rel=$2
cmd=$3
echo $$ > "$run/pid"
cd "$rel" || { echo 127 > "$run/exit"; exit 127; }
set -a
. "$HOME/.vtool/cluster.env"
set +a
{ sh -c "$cmd" </dev/null; echo $? > "$run/exit.tmp"; mv -f "$run/exit.tmp" "$run/exit"; } 2>&1 | tee -a "$run/log"
"""


# Keeps the payload arriving on stdin and passes it on, as it arrives, to up to two other
# nodes (over the cluster's own SSH), each of which does the same for its share of the rest:
# a pipelined binary tree, so the client's uplink carries the payload once and no node waits
# for another to finish. Every node keeps a copy (~/.vtool/packages), to pass it on later,
# and unpacks it once it is complete, off the relay's path, except for a plain tar (what
# vtool sends when compressing would save little, or when a node has no zstd): a copy of that
# is as big as the release, so each node but the first unpacks it as it arrives, into a
# folder of its own that becomes the release only once the stream is complete, and writes
# the package once, not twice. (Measured with perf, a 20 MB plain tar into 32 local nodes, on
# a machine whose page cache was growing: the nodes' CPU was 8.0 s instead of 9.6 s; the
# programs that write, perl and tar, 1.3 s instead of 3.5 s. A compressed copy costs less to
# write than its release, and unpacking many small files as they arrive holds up the relay:
# a 900-file zstd package into 32 nodes took about 0.3 s longer so, in a first measurement.)
# Without perl a node always keeps a copy and unpacks it once complete.
# Prints "vtool-got NAME" ("vtool-got NAME kept" on a node that kept a copy) once its own
# copy is complete; the lines of the nodes below it come up the same way. A node that fails
# leaves only its own subtree without the payload (the copy goes on to the others); vtool
# sends those afterwards. Then it runs AFTER (a shell command in base64, "-" for none: the
# install, given the folder it unpacked into as $vtool_x, if any) and prints
# "vtool-unpacked NAME EXIT_CODE".
# Arguments: ITS_NAME PAYLOAD SIZE AFTER Z [NAME ...] (names: the Hosts of ~/.vtool/ssh_config;
# Z: what the first node checks the stream with, see below).
FAN = r"""#!/bin/sh
# written by vtool: keep or unpack the payload on stdin and pass it on to the nodes named (see vtool/remote.py)
# The first node appends "ok" to what the client sends once it is checked: decompressed
# ($z: gzip or bzip2), tested as it passes ($z: zstd) or as it is ($z: cat, a plain tar,
# covered by SSH and the size). The others ($z: -) pass the stream on as they get it, and
# keep their copy, or install what they unpacked, only with that "ok".
me=$1; p=$2; size=$3; after=$4; z=$5; shift 5
pk="$HOME/.vtool/packages"
rd="$HOME/.vtool/releases"
[ -d "$pk" ] && [ -d "$rd" ] || mkdir -p "$pk" "$rd" || exit 4
part="$pk/.$p.part.$$"
kids=
ux=
trap 'kill $kids 2>/dev/null; rm -rf "$part" "$part.after" "$part.t" "$part.err" "$pk/.$p.to.$$".* ${ux:+"$ux"}' EXIT
trap 'exit 4' HUP TERM PIPE
a=; b=; ra=; rb=; i=0
for h in "$@"; do
  case $i in
    0) a=$h ;;
    1) b=$h ;;
    *) if [ $((i % 2)) = 0 ]; then ra="$ra $h"; else rb="$rb $h"; fi ;;
  esac
  i=$((i + 1))
done
tf=-
case $p in *.tar)  # (see keep) a plain tar is unpacked as it arrives, into $ux
  if command -v perl >/dev/null 2>&1; then
    ux=$(mktemp -d "$rd/.incoming.XXXXXX") || exit 4
    tf="$pk/.$p.to.$$.x"
  fi ;;
esac
set --  # every fifo first, in one mkfifo: a failure here leaves no ssh waiting on one
for c in a b; do
  eval "h=\$$c"
  [ -z "$h" ] || set -- "$@" "$pk/.$p.to.$$.$c"
done
[ "$tf" = - ] || set -- "$@" "$tf"
[ $# = 0 ] || mkfifo "$@" || exit 4
xt=
if [ "$tf" != - ]; then
  tar -x -f - -C "$ux" --no-same-owner < "$tf" 2> "$part.err" &
  xt=$!
  kids=$xt  # (stopped with the others if this script is)
fi
outs=
for c in a b; do
  eval "h=\$$c; r=\$r$c"
  [ -n "$h" ] || continue
  f="$pk/.$p.to.$$.$c"
  ssh -F "$HOME/.vtool/ssh_config" "$h" "exec sh \"\$HOME/.vtool/bin/vtool-fan\" $h $p $size $after -$r" < "$f" &
  kids="$kids $!"
  outs="$outs $f"
done
keep() {  # stdin into the fifos after $4 as it arrives (a reader that is gone is dropped),
  # and its first $3 bytes into $1 (a copy kept as $2 if it is $3 bytes and "ok" follows; "-":
  # none) and into the fifo $4 (the unpack; "-": none). Exit 0 if all $3 bytes and "ok" came.
  if command -v perl >/dev/null 2>&1; then  # in blocks of up to 1 MB (tee's are 8 KB)
    perl -e '$SIG{PIPE} = "IGNORE"; my ($part, $final, $size, $tarf, @fifos) = @ARGV; my (@o, $t, $k);
      # 1 MB pipes (F_SETPIPE_SZ, where allowed; 64 KB otherwise): the readers take 1 MB at
      # a time and one slow reader holds the others up less (32 local nodes: a quarter less CPU).
      # (Past the pipe-user-pages-soft of its user, other new pipes of that user start at 8 KB
      # while this runs: many local nodes, or an EC2 node running much more, as one user.)
      sub big { fcntl($_[0], 1031, 1 << 20) }
      big(*STDIN);
      for my $p (@fifos) { open(my $h, ">", $p) or die "$p: $!\n"; big($h); push @o, $h }
      if ($tarf ne "-") { open($t, ">", $tarf) or die "$tarf: $!\n"; big($t) }
      if ($part ne "-") { open($k, ">", $part) or die "$part: $!\n" }
      my ($b, $n, $got, $end) = ("", 0, 0, "");
      sub put { my ($h, $len) = @_; my $off = 0;
        while ($off < $len) { my $w = syswrite($h, $b, $len - $off, $off); return 0 unless defined $w; $off += $w }
        return 1 }
      while ($n = sysread(STDIN, $b, 1 << 20)) {
        my $mine = $size - $got;  # of this block, the payload (the "ok" after it is for the fifos)
        $mine = $n if $mine > $n;
        $mine = 0 if $mine < 0;
        $got += $n;
        $end = substr($end . substr($b, -2), -2);
        for my $i (0 .. $#o) { $o[$i] = undef if $o[$i] && !put($o[$i], $n) }
        if ($k && $mine) { put($k, $mine) or die "$part: $!\n" }
        $t = undef if $t && $mine && !put($t, $mine);  # (the unpack failed: FAN sees its exit code)
      }
      defined $n or die "$!\n";
      close($t) if $t;
      exit 3 unless $got == $size + 2 && $end eq "ok";
      if ($k) { close($k) && rename($part, $final) or die "$part: $!\n" }' "$@"
  else
    kp=$1; kf=$2; ks=$3; shift 4
    tee -p "$@" > "$kp"
    [ "$(stat -c %s "$kp")" = $((ks + 2)) ] && [ "$(tail -c 2 "$kp")" = ok ] &&
      truncate -s "$ks" "$kp" && mv -f "$kp" "$kf"
  fi
}
k="$pk/$p"
copy="$part"  # kept by the first node, and by every node that does not unpack as it goes
[ "$z" != - ] || [ "$tf" = - ] || copy=-
case $z in
  -) keep "$copy" "$k" "$size" "$tf" $outs ;;
  cat) { cat && printf ok; } | keep "$copy" "$k" "$size" "$tf" $outs ;;
  zstd) mkfifo "$part.t" || exit 4
    { zstd -tq < "$part.t" & t=$!; tee "$part.t" && wait $t && printf ok; } | keep "$copy" "$k" "$size" "$tf" $outs ;;
  *) { $z -dc && printf ok; } | keep "$copy" "$k" "$size" "$tf" $outs ;;
esac
rc=$?
if [ -n "$xt" ]; then  # the unpack: done once its input ended (or stopped: it failed)
  [ $rc = 0 ] || kill $xt 2>/dev/null
  wait $xt; xr=$?
  if [ $rc = 0 ] && [ $xr != 0 ]; then  # a copy that did not unpack is not kept either
    cat "$part.err" >&2; [ "$copy" = - ] || rm -f "$k"; rc=5
  fi
fi
if [ $rc = 0 ]; then
  if [ "$copy" = - ]; then echo "vtool-got $me"; else echo "vtool-got $me kept"; fi
  if [ "$after" != - ]; then  # (read in a subshell: no second sh started)
    printf %s "$after" | base64 -d > "$part.after" && (vtool_x=$ux; . "$part.after") </dev/null; x=$?
    echo "vtool-unpacked $me $x"
  fi
else
  rc=4
fi
wait
kids=
exit $rc
"""


def env_file(cluster: str, node: Node, nodes: Sequence[Node], extra: Mapping[str, str]) -> str:
    ordered = sorted(nodes, key=lambda n: n.index)
    rank = next((i for i, n in enumerate(ordered) if n.index == node.index), 0)
    head = ordered[0].private_address if ordered else node.private_address
    values = {
        "VTOOL_CLUSTER": cluster,
        "VTOOL_NODE_INDEX": str(node.index),
        "VTOOL_NODE_RANK": str(rank),
        "VTOOL_NODE_COUNT": str(len(ordered)),
        "VTOOL_NODE_NAME": node.name,
        "VTOOL_NODE_ADDRESS": node.private_address,
        "VTOOL_HEAD": head,
    }
    values.update(extra)
    lines = ["# written by vtool at each launch and inject; sourced by the launch wrapper"]
    lines += [f"{key}={q(value)}" for key, value in values.items()]
    lines.append("export " + " ".join(values))
    return "\n".join(lines) + "\n"


def node_ssh_config(
    nodes: Sequence[Node], kex: str, ciphers: str, address: Mapping[int, tuple[str, int]] | None = None
) -> str:
    """The Host blocks of ~/.vtool/ssh_config (the node prepends its own key and known_hosts
    paths: OpenSSH expands ``~`` from the password database, not from $HOME). ``address``:
    where the nodes reach a node, by index (default: its private address and port)."""
    lines: list[str] = []
    for n in sorted(nodes, key=lambda n: n.index):
        host, port = (address or {}).get(n.index, (n.private_address, n.port))
        lines += [
            f"Host {n.name}",
            f"  HostName {host}",
            f"  Port {port}",
            f"  User {n.user}",
            f"  HostKeyAlias {n.host_key_alias}",
        ]
    lines += [
        "Host *",
        "  IdentitiesOnly yes",
        "  BatchMode yes",
        "  StrictHostKeyChecking yes",
        "  GlobalKnownHostsFile /dev/null",
        "  CheckHostIP no",
        "  UpdateHostKeys no",
        "  ConnectTimeout 10",
        "  ServerAliveInterval 5",
        "  ServerAliveCountMax 3",
        "  LogLevel ERROR",
    ]
    if kex:
        lines.append(f"  KexAlgorithms {kex}")
    if ciphers:
        lines.append(f"  Ciphers {ciphers}")
    return "\n".join(lines) + "\n"


def fan_children(names: Sequence[str]) -> dict[str, list[str]]:
    """Who passes the payload on to whom in FAN's tree over ``names`` (the first is fed by
    the client): the same split the script makes."""
    out: dict[str, list[str]] = {}

    def walk(me: str, rest: Sequence[str]) -> None:
        kids = list(rest[:2])
        out[me] = kids
        for j, kid in enumerate(kids):
            walk(kid, rest[2 + j :: 2])

    if names:
        walk(names[0], names[1:])
    return out


def _control_lines(d: str, longest_name: int) -> str:
    """Shell: set $ctl to ssh_config lines that make the nodes' SSH use shared connections
    (``ControlPath`` in $cm, which the caller creates), when the socket path fits (a Unix
    socket name is at most 107 bytes, and ssh adds 17 while it creates one); else to nothing."""
    return (
        f'cm="{d}/cm"; ctl=; '
        f"if [ $((${{#cm}} + {1 + longest_name + 17})) -le 104 ]; then "
        'ctl="  ControlMaster no\n  ControlPath $cm/%n\n"; fi'
    )


def _warm(d: str, names: Sequence[str]) -> str:
    """Shell: open, in the background, a shared connection (kept 2 minutes after its last
    use) to each node in ``names`` that has none yet, so a transfer to it starts at once.
    (Without its socket there is none: ssh is asked only about a socket that exists.)"""
    ssh = f'ssh -F "{d}/ssh_config"'
    one = (
        f'{{ [ -S "$cm/$h" ] && {ssh} -O check "$h" 2>/dev/null; }} || '
        f'{ssh} -o ControlMaster=yes -o ControlPersist=120 -fN "$h"'
    )
    hosts = " ".join(q(x) for x in names)
    return f'if [ -n "$ctl" ]; then for h in {hosts}; do ({one}) </dev/null >/dev/null 2>&1 & done; fi'


def prepare(
    cluster: str,
    node: Node,
    nodes: Sequence[Node],
    extra_env: Mapping[str, str],
    release: Release | None,
    trust: tuple[str, str, str] | None = None,
    warm: Sequence[str] = (),
) -> str:
    """Write the cluster files; print ``have`` (``have kept`` when the node also keeps the
    package, to pass it on), or ``need BASE`` (BASE: the release folder ``~/NAME`` points at
    now, ``-`` if none) for ``release``'s folder.

    ``trust`` = (public key, known_hosts lines, ssh_config blocks): the cluster-internal key
    lets the nodes reach each other; its private half arrives on stdin (never in a command line).
    ``warm``: nodes this one will likely pass the whole package on to; when it needs the whole
    package itself, it connects to them in the background meanwhile.
    """
    ordered = sorted(nodes, key=lambda n: n.index)
    hosts = "".join(f"{n.private_address}\n" for n in ordered)
    others = "".join(f"{n.private_address}\n" for n in ordered if n.index != node.index)
    table = "".join(f"{n.index} {n.name} {n.private_address} {n.port}\n" for n in ordered)
    d = "$HOME/.vtool"
    # Every file is written into a new folder first (shell built-ins only), then moved into
    # place in one `mv` per folder (each file replaced atomically): a few programs started
    # per node instead of two per file, which counts on a node that is also busy (each
    # program started costs about 1 ms of CPU on the machine the bench runs on). None at all
    # when the node has them already: "$d/.prepared" names what was written last (a digest
    # of it), and it is written only once every file is in place; a file changed since (by
    # an older vtool, say, which writes no digest) is newer than it.
    s = "$st"
    files = {
        "cluster.env": env_file(cluster, node, nodes, extra_env),
        "hosts": hosts,
        "other_hosts": others,
        "nodes": table,
        "bin/vtool-run": RUN_WRAPPER,
        "bin/vtool-fan": FAN,
    }
    write = [
        f'[ ! -f "{d}/.prepared" ] || true > "{d}/.prepared"',  # (names nothing until all is written again)
        f'mkdir -p "{d}/releases" "{d}/runs" "{d}/bin" "{d}/packages" "{s}"',
        """trap 'rm -rf "$st"' EXIT""",
        *(f'printf %s {q(text)} > "{s}/{name.rsplit("/", 1)[-1]}"' for name, text in files.items()),
    ]
    if trust is not None:
        pub, known, config = trust
        files.update({"relay_key": pub, "known_hosts": known, "ssh_config": config})  # (for the digest)
        write += [
            "umask 077",  # (the key on stdin, copied by the shell: no program started)
            f'while IFS= read -r l || [ -n "$l" ]; do printf "%s\\n" "$l"; done > "{s}/relay_key"',
            f'printf %s {q(known)} > "{s}/known_hosts"',
            f'{{ printf "Host *\\n  IdentityFile %s\\n  UserKnownHostsFile %s\\n%b" "{d}/relay_key" "{d}/known_hosts" "$ctl"; '
            f'printf %s {q(config)}; }} > "{s}/ssh_config"',
            "umask 022",
        ]
    write += [
        f'mv -f "{s}/vtool-run" "{s}/vtool-fan" "{d}/bin/"',
        f'mv -f "{s}/"* "{d}/"',
        f'rmdir "{s}"',
        "trap - EXIT",
        f'printf "%s\\n" "$h" > "{d}/.prepared"',
    ]
    import hashlib  # here, not at the top: vtool run never loads OpenSSL (tests/test_early.py)
    import json

    digest = hashlib.sha256(json.dumps(["prepare 1", write, files], sort_keys=True).encode()).hexdigest()[:32]
    parts = ["set -e", "umask 022", f'st="{d}/.prepare.$$"', f"h={digest}"]
    if trust is not None:
        parts.append(_control_lines(d, max((len(n.name) for n in nodes), default=0)))
    parts += [
        # (built-ins only: `read` ends at the newline it was written with)
        f'w=; [ -f "{d}/.prepared" ] && read -r w < "{d}/.prepared" || w=',
        f'for f in {" ".join(q(name) for name in files)}; do [ -f "{d}/$f" ] && [ ! "{d}/$f" -nt "{d}/.prepared" ] || w=; done',
        f'for f in releases runs bin packages; do [ -d "{d}/$f" ] || w=; done',
        f'if [ "$w" != "$h" ]; then {"; ".join(write)}; fi',
    ]
    if trust is not None:
        ak = '"$HOME/.ssh/authorized_keys"'
        parts += [
            '[ -z "$ctl" ] || [ -d "$cm" ] || (umask 077; mkdir "$cm")',
            f'[ -f {ak} ] || (umask 077; mkdir -p "$HOME/.ssh"; : >> {ak})',
            # Is the key there? (read by the shell; a last line without a newline gets one first)
            f'k=; n=; while IFS= read -r l || {{ [ -n "$l" ] && n=1; }}; do [ "$l" != {q(pub)} ] || k=1; done < {ak}',
            f'[ -n "$k" ] || printf "${{n:+\\n}}%s\\n" {q(pub)} >> {ak}',
        ]
    if release is not None:
        parts.append(
            # "have kept": it also keeps the package, so it can pass it on (see FAN)
            f'if [ -d "{d}/releases/"{q(release.dirname)} ]; then k=; '
            f'for f in "{d}/packages/"{q(release.payload())} "{d}/packages/"{q(release.payload(zstd=True))}; '
            'do [ ! -f "$f" ] || k=" kept"; done; echo "have$k"; else '
            f'b=$(readlink "$HOME/"{q(release.name)} 2>/dev/null) || b=; b=${{b##*/}}; '
            f'case "$b" in {q(release.name)}-*) [ -d "{d}/releases/$b" ] || b=-;; *) b=-;; esac; '
            'z=; if command -v zstd >/dev/null 2>&1; then z=" zstd"; fi; echo "need $b$z"; '
            + (f'if [ "$b" = - ]; then {_warm(d, warm)}; fi; ' if warm and trust is not None else "")
            + "fi"
        )
    return "; ".join(parts)


# Exit codes of the node scripts below that vtool acts on.
BASE_CHANGED = 42  # a delta's base release is missing or was changed on the node: send it whole
RELAY_UNREACHABLE = 75  # the relaying node could not reach the receiving one
RELAY_NO_PAYLOAD = 76  # the relaying node no longer has the payload


# What decompresses each compression on the node, from stdin to stdout ("": nothing to undo).
DECOMPRESS = {"": "cat", "gz": "gzip -dc", "bz2": "bzip2 -dc", "zst": "zstd -dc"}
DAMAGED = "the package does not decompress (is its archive in vtool's package store damaged?)"
# What checks a kept copy of each compression, reading the file named last.
_TEST = {"gz": "gzip -tq", "bz2": "bzip2 -tq", "zst": "zstd -tq", "none": "tar -tf"}


def install(
    release: Release,
    payload: str,
    size: int,
    base: str | None = None,
    compression: str = "",
    kept: bool = False,
    inflate: str = "",
) -> str:
    """Unpack the payload on stdin into the release folder (atomically; a no-op if present).

    The payload (the package, or with ``base`` a delta from that release folder) is also kept
    as ``~/.vtool/packages/PAYLOAD``, so this node can pass it on: the stream's own checksum
    (gzip's or bzip2's CRC, checked by tar) covers the bytes, and the kept copy's size is
    checked (a full disk would cut it short).

    ``compression``: the payload's, when it is not the release's (a delta is a .tar.gz).
    ``inflate``: stdin is the payload compressed so ("gz", "bz2"); the node decompresses it
    (the decompressor's check covers the bytes) and keeps the payload plain, ``size`` bytes.
    ``kept``: unpack the copy already in ``~/.vtool/packages`` (see ``receive``), not stdin.
    With ``base``, the files the delta does not carry are hard links to the base release's,
    once their sha256 is checked: that release is never changed by vtool, and a base that
    was changed on the node makes the install exit BASE_CHANGED (the caller sends it whole).
    """
    flag = {"gz": "-z", "bz2": "-j", "zst": "-I zstd", "none": ""}[compression or release.compression]
    parts = [
        "set -e",
        'd="$HOME/.vtool/releases"',
        'pk="$HOME/.vtool/packages"',
        '[ -d "$d" ] && [ -d "$pk" ] || mkdir -p "$d" "$pk"',  # (prepare made them: no program started)
        f'rel="$d/"{q(release.dirname)}',
    ]
    if kept:
        parts += [
            'if [ -d "$rel" ]; then exit 0; fi',
            # In FAN, $vtool_x is the folder the node unpacked the payload into as it arrived.
            'x=${vtool_x-}; if [ -n "$x" ] && [ -d "$x" ]; then tmp=$x; else x=; '
            f'[ -f "$pk/"{q(payload)} ] || {{ echo "the package is not on the node" >&2; exit 4; }}; '
            'tmp=$(mktemp -d "$d/.incoming.XXXXXX"); fi',
            # (FAN removes the folder it made, with what is left in it, as it ends)
            '[ -n "$x" ] || trap \'rm -rf "$tmp"\' EXIT',
            # A copy that does not unpack because it is damaged is not kept: a later inject
            # or relay would reuse it. One that fails for another reason (a full disk) is, and
            # so is one the check could not judge: only the checker's own "no" (exit 1 or 2)
            # says damaged, not a checker that is missing (127) or was killed (128 + signal).
            f'[ -n "$x" ] || tar -x {flag} -f "$pk/"{q(payload)} -C "$tmp" --no-same-owner '
            f'|| {{ x=$?; t=0; {_TEST[compression or release.compression]} "$pk/"{q(payload)} >/dev/null 2>&1 || t=$?; '
            f'case $t in 1|2) rm -f -- "$pk/"{q(payload)}; echo {q(DAMAGED)} >&2;; esac; exit $x; }}',
        ]
    else:
        parts += [
            'if [ -d "$rel" ]; then cat >/dev/null; exit 0; fi',
            'tmp=$(mktemp -d "$d/.incoming.XXXXXX")',
            "trap 'rm -rf \"$tmp\"' EXIT",
            # Received, kept and unpacked in one pass; the kept copy is checked before it is used.
            *_unpack_stream(inflate, compression or release.compression, size),
        ]
    parts.append(
        f'[ -d "$tmp/"{q(release.name)} ] || {{ echo "the package has no folder "{q(release.name)} >&2; exit 3; }}'
    )
    if base is not None:
        parts += [
            f'b="$d/"{q(base)}',
            f'[ -d "$b" ] || exit {BASE_CHANGED}',
            # The base's files are trusted without reading them when none of the ones kept was
            # modified since it was unpacked (the stamp); else their sha256 decides.
            f'st="$d/."{q(base)}".unpacked"',
            'if [ -s "$tmp/.vtool-keep" ] && [ -f "$st" ] && (cd "$b" && sed -z "s|^|./|" "$tmp/.vtool-keep" '
            '| xargs -0 sh -c \'find "$@" -prune -newer "$0" -print\' "$st") > "$tmp/.newer" 2>/dev/null '
            '&& [ ! -s "$tmp/.newer" ]; then :; '
            f'elif [ -s "$tmp/.vtool-sums" ]; then (cd "$b" && sha256sum -c --status --strict "$tmp/.vtool-sums") || exit {BASE_CHANGED}; fi',
            f'if [ -s "$tmp/.vtool-keep" ]; then (cd "$b" && xargs -0 cp -l --parents -t "$tmp/"{q(release.name)} -- < "$tmp/.vtool-keep"); fi',
        ]
    parts += [
        # Another inject may have unpacked the same release meanwhile: that is as good.
        f'mv -T "$tmp/"{q(release.name)} "$rel" 2>/dev/null || [ -d "$rel" ]',
        # When it was unpacked (see base above), set 2 s back: a file changed right after it,
        # within the same tick of the file system's clock (a few ms on ext4), has the stamp's
        # very time and would not be newer. (Without GNU touch's -d, the stamp says now.)
        f'u="$d/."{q(release.dirname)}".unpacked"; touch -d "2 seconds ago" "$u" 2>/dev/null || : > "$u"',
        "true" if kept else f'mv -f "$tmp/.payload" "$pk/"{q(payload)}',
        # Keep only this release's payloads (a node passes on what it has just received).
        f'for f in "$pk"/*; do [ -e "$f" ] || [ -L "$f" ] || continue; case "${{f##*/}}" in {q(release.dirname)}*) ;; *) rm -f -- "$f";; esac; done',
    ]
    return "; ".join(parts)


def _unpack_stream(inflate: str, compression: str, size: int) -> list[str]:
    """Shell: keep stdin as "$tmp/.payload" (``size`` bytes) and unpack it into "$tmp",
    decompressing it before it is kept (``inflate``) or after (``compression``); then say
    what went wrong, if anything. The decompressor's own verdict decides "damaged" (exit 1
    or 2; killed by SIGPIPE, tar or tee failed first, e.g. on a full disk)."""
    untar = 'tar -x -f - -C "$tmp" --no-same-owner'
    incomplete = (
        f'[ "$(stat -c %s "$tmp/.payload")" = {int(size)} ] || '
        '{ echo "the package arrived incomplete (is the disk full?)" >&2; exit 4; }'
    )

    def verdict(damaged: str) -> list[str]:
        return [
            'read z 2>/dev/null < "$tmp/.z" || z=9',
            f"case $z in 0) ;; 1|2) echo {q(damaged)} >&2; exit 4;; "
            '*) [ "$x" != 0 ] || { echo "decompressing the package failed (exit $z)" >&2; exit 4; };; esac',
        ]

    if inflate:  # (a stream cut short does not decompress either: it cannot be told from damage here)
        return [
            f'x=0; {{ {DECOMPRESS[inflate]}; echo $? > "$tmp/.z"; }} | tee "$tmp/.payload" | {untar} || x=$?',
            *verdict(
                "the package does not decompress (is its archive in vtool's package store damaged, or was the transfer cut short?)"
            ),
            '[ "$x" = 0 ] || exit "$x"',
            incomplete,
        ]
    if compression == "none":
        return [f'tee "$tmp/.payload" | {untar}', incomplete]
    # tee -p goes on keeping the stream when the decompressor stops at damage: the copy is
    # complete, so the damage is the archive's, not the transfer's.
    return [
        f'x=0; tee -p "$tmp/.payload" | {{ {DECOMPRESS[compression]}; echo $? > "$tmp/.z"; }} | {untar} || x=$?',
        incomplete,
        *verdict(DAMAGED),
        '[ "$x" = 0 ] || exit "$x"',
    ]


def receive(payload: str, size: int, inflate: str = "") -> str:
    """Keep the payload on stdin as ``~/.vtool/packages/PAYLOAD`` (size checked), without
    unpacking it: a relayed node can pass it on at once and unpack it afterwards (``install``
    with ``kept``). SSH's integrity check covers the transfer; the unpack checks the
    compressor's checksum. ``inflate``: as in ``install`` (the decompressor's check covers
    the bytes)."""
    f = f'"$pk/"{q(payload)}'
    return "; ".join(
        [
            "set -e",
            'pk="$HOME/.vtool/packages"',
            'mkdir -p "$pk"',
            f'if [ -f {f} ] && [ "$(stat -c %s {f})" = {int(size)} ]; then cat >/dev/null; exit 0; fi',
            f'part="$pk/."{q(payload)}".part.$$"',
            "trap 'rm -f \"$part\"' EXIT",
            f'{DECOMPRESS[inflate]} > "$part"'
            + (
                " || { echo \"decompressing the package failed (a damaged archive in vtool's package store, "
                'or a full disk on the node)" >&2; exit 4; }'
                if inflate
                else ""
            ),
            f'[ "$(stat -c %s "$part")" = {int(size)} ] || '
            '{ echo "the package arrived incomplete (is the disk full?)" >&2; exit 4; }',
            f'mv -f "$part" {f}',
        ]
    )


def relay(to: Node, payload: str, size: int, install_command: str) -> str:
    """On a node holding ``payload`` (``size`` bytes: a copy of another size, e.g. made by
    another vtool, is not passed on): send it to node ``to`` over the cluster's own SSH,
    where ``install_command`` unpacks it. Exit codes: the install's, or
    RELAY_UNREACHABLE/NO_PAYLOAD."""
    return "; ".join(
        [
            f'f="$HOME/.vtool/packages/"{q(payload)}',
            f'[ -f "$f" ] && [ "$(stat -c %s "$f")" = {int(size)} ] || '
            f'{{ echo "no payload to pass on" >&2; exit {RELAY_NO_PAYLOAD}; }}',
            f'ssh -F "$HOME/.vtool/ssh_config" {q(to.name)} {q(install_command)} < "$f"',
            "rc=$?",
            f"if [ $rc = 255 ]; then exit {RELAY_UNREACHABLE}; fi",
            "exit $rc",
        ]
    )


def fan(me: str, payload: str, size: int, rest: Sequence[str], after: str = "", inflate: str = "") -> str:
    """On the first node of a pipelined broadcast (see FAN): keep the payload on stdin and
    pass it on to the nodes named ``rest``, which pass it on in turn; each then runs ``after``
    (the unpack). Every name must be a plain token (node names and payload names are).
    ``inflate``: as in ``install``; only this node decompresses, the others get it plain."""
    import base64

    code = base64.b64encode(after.encode()).decode() if after else "-"
    check = DECOMPRESS[inflate].split()[0] if inflate else ("zstd" if payload.endswith(".zst") else "cat")
    args = (me, payload, int(size), code, check, *rest)
    return " ".join(["exec", "sh", '"$HOME/.vtool/bin/vtool-fan"', *(q(x) for x in args)])


def start(release: Release, launch_command: str, use_screen: bool, stamp: str) -> str:
    """Point ~/NAME at the release (atomic switch) and start the launch command, detached.
    ``stamp``: the run's time, YYYYmmdd-HHMMSS (UTC, the client's clock: one program fewer
    started per node), which names its folder."""
    name = q(release.name)
    cmd = q(launch_command)
    screen = (
        (
            "if command -v screen >/dev/null 2>&1; then "
            f'screen -dmS vtool-{name} sh "$HOME/.vtool/bin/vtool-run" "$run" "$rel" {cmd}; echo screen; exit 0; fi'
        )
        if use_screen
        else "true"
    )
    return "\n".join(
        [
            "set -e",
            f'rel="$HOME/.vtool/releases/"{q(release.dirname)}',
            f'link="$HOME/"{name}',
            f'if [ -e "$link" ] && [ ! -L "$link" ]; then echo "~/"{name}" exists and is not a vtool release link: move it away" >&2; exit 3; fi',
            f'ln -sfn "$rel" "$HOME/."{name}".vtool-tmp.$$"',
            f'mv -Tf "$HOME/."{name}".vtool-tmp.$$" "$link"',
            f'run="$HOME/.vtool/runs/"{q(stamp)}"-$$"',
            'mkdir -p "$run"',
            f'printf %s {q(release.dirname)} > "$run/release"',
            f'printf %s {cmd} > "$run/command"',
            'ln -sfn "$run" "$HOME/.vtool/.current.vtool-tmp.$$"',
            'mv -Tf "$HOME/.vtool/.current.vtool-tmp.$$" "$HOME/.vtool/current"',
            screen,
            f'setsid sh "$HOME/.vtool/bin/vtool-run" "$run" "$rel" {cmd} </dev/null >/dev/null 2>&1 &',
            "echo detached",
        ]
    )


# What a command's first word must not be for ``exec`` to run it as the shell would: the
# builtins and reserved words of bash (which ``exec`` cannot run, or would run as another
# program of the same name).
_SHELL_WORDS = frozenset(
    ". : [ [[ ]] { } ! alias bg bind break builtin caller case cd command compgen complete compopt continue "
    "coproc declare dirs disown do done echo elif else enable esac eval exec exit export false fc fg fi for "
    "function getopts hash help history if in jobs kill let local logout mapfile popd printf pushd pwd read "
    "readarray readonly return select set shift shopt source suspend test then time times trap true type "
    "typeset ulimit umask unalias unset until wait while".split()
)
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./:,+@%-][A-Za-z0-9_./:,+@%=-]*")


def _one_program(command: str) -> bool:
    """Whether ``command`` is one program with plain arguments (``python3 train.py --seed=3``):
    no quoting, expansion, redirection, assignment or second command, and no shell builtin."""
    words = [w for w in command.split(" ") if w]  # (split on spaces only: a tab or newline is refused)
    return (
        bool(words)
        and words[0] not in _SHELL_WORDS
        and "=" not in words[0]
        and all(_PLAIN_WORD.fullmatch(w) for w in words)
    )


_DRAIN = "while read -r _; do :; done"  # until vtool's end closes (a builtin: no program starts)


def supervised(command: str) -> str:
    """Run ``command`` as ``ssh node COMMAND`` would (evaluated by the session's login shell),
    with the node's VTOOL_* variables set (as the launch script has them) and stdin empty.
    Its exit code is the command's.

    sshd starts every session in a session (and process group) of its own, so the shell's
    ``$$`` is the group of everything the command starts. The wrapper names it on stderr
    (``ssh.PGID_MARK``, a line vtool takes out), and vtool stops the group with ``stop`` when
    it does not wait for the command to finish (a timeout, Ctrl-C), and with ``guard``, a
    second session, once the command has run for a while (``ssh._Watch``), if vtool itself
    goes away. Nothing else is started on the node: a watcher forked by every command's
    shell cost 0.6-0.9 ms of the node's CPU per command. The command's text is in
    ``vtool_c`` only until ``eval`` has read it.

    When the shell leads no group of its own (a ForceCommand wrapper that starts it as a
    child, say), the command runs in a ``$SHELL -c`` of its own, in a group made by
    ``setsid``, with a watcher that reads the client's end (stdin, which vtool keeps open)
    until end-of-file and then signals that group (``kill -TERM -PID``, not ``kill -- -PID``:
    dash's kill takes no ``--``).

    bash starts one program with plain arguments (``_one_program``) with ``exec``, not in a
    fork of its own."""
    shell = '"${SHELL:-/bin/sh}"'
    # bash starts the last command of ``bash -c`` in its own process, but forks for one that
    # eval runs: one program (the usual case) is started with exec instead, in bash.
    # (Not when the word is a shell function or alias, e.g. `module` from BASH_ENV or ~/.bashrc.)
    run = 'eval "unset vtool_c; $vtool_c"'
    if _one_program(command):
        first = command.split()[0]
        run = (
            f'if [ -n "${{BASH_VERSION-}}" ] && ! declare -F {first} >/dev/null && ! alias {first} >/dev/null 2>&1; '
            f"then unset vtool_c; exec {command}; fi; {run}"
        )
    mark = "\\036" + PGID_MARK[1:]
    return "\n".join(
        [
            "vtool_c=" + q(command),
            'if [ -r "$HOME/.vtool/cluster.env" ]; then set -a; . "$HOME/.vtool/cluster.env"; set +a; fi',
            "if kill -0 -$$ 2>/dev/null; then",
            f"  printf '{mark}%s\\n' $$ >&2",
            "  exec </dev/null",
            f"  {run}",
            "  exit",
            "fi",
            "exec 3<&0",
            "if command -v setsid >/dev/null 2>&1; then vtool_s=setsid; else vtool_s=; fi",
            f'$vtool_s {shell} -c "$vtool_c" </dev/null 3<&- &',
            "vtool_pid=$!",
            f'({_DRAIN}; kill -TERM -"$vtool_pid" 2>/dev/null || kill -TERM "$vtool_pid") <&3 >/dev/null 2>&1 &',
            "vtool_watch=$!",
            "exec 3<&-",
            'wait "$vtool_pid"',
            "vtool_rc=$?",
            'kill "$vtool_watch" 2>/dev/null',
            "exit $vtool_rc",
        ]
    )


def _stop_group(pgid: int) -> str:
    # Only while its leader (the command's shell) runs: what a finished command left running
    # in the background stays, as under plain ssh.
    return f"kill -0 {int(pgid)} 2>/dev/null && kill -TERM -{int(pgid)} 2>/dev/null; exit 0"


def _guard_group(pgid: int) -> str:
    return f"{_DRAIN}; {_stop_group(pgid)}"


# How vtool stops a supervised command on its node (ssh._Watch).
SUPERVISION = Supervision(stop=_stop_group, guard=_guard_group)


STATUS = """c="$HOME/.vtool/current"
if [ ! -d "$c" ]; then echo none; exit 0; fi
rel=$(cat "$c/release" 2>/dev/null || true)
pid=$(cat "$c/pid" 2>/dev/null || true)
if [ -f "$c/exit" ]; then echo "exited $(cat "$c/exit") $rel"
elif [ -z "$pid" ]; then echo "starting - $rel"
elif kill -0 "$pid" 2>/dev/null; then echo "running $pid $rel"
else echo "killed - $rel"; fi"""


def logs(follow: bool, lines: int | None = None) -> str:
    start_at = f"-n {int(lines)}" if lines else "-n +1"
    tail = f"tail {start_at} -F" if follow else f"tail {start_at}"
    return (
        'f="$HOME/.vtool/current/log"; '
        'if [ ! -e "$f" ] && [ ! -L "$HOME/.vtool/current" ]; then echo "no launch script has run on this node" >&2; exit 3; fi; '
        f'exec {tail} -- "$f"'
    )


def fetch(remote: str, recursive: bool) -> str:
    """Send ``remote`` (relative to the home folder) as a tar stream on stdout."""
    return "; ".join(
        [
            f"p={q(remote)}",
            'case "$p" in "~") p=.;; "~/"*) p="${p#"~/"}";; esac',  # ~ is the home folder, as in scp
            'if [ ! -e "$p" ]; then echo "no such file or folder: $p" >&2; exit 44; fi',
            'p=$(readlink -f -- "$p")',  # the real name: no ".", "..", trailing "/" or link left
            f'if [ -d "$p" ] && [ {int(recursive)} = 0 ]; then echo "$p is a folder: use -r" >&2; exit 45; fi',
            'cd -- "$(dirname -- "$p")"',
            'exec tar -c -f - -- "$(basename -- "$p")"',
        ]
    )


def put(remote: str, local_name: str, is_dir: bool) -> str:
    """Receive a tar stream whose single top entry is ``x`` and place it at ``remote``."""
    return "; ".join(
        [
            "set -e",
            f"dst={q(remote)}",
            'case "$dst" in /*) ;; *) dst="./$dst";; esac',  # a name starting with "-" stays a name
            f'case "$dst" in */) dst="$dst"{q(local_name)};; esac',
            f'if [ -d "$dst" ] && [ ! -L "$dst" ] && [ {int(is_dir)} = 0 ]; then dst="$dst/"{q(local_name)}; fi',
            'dir=$(dirname -- "$dst")',
            'mkdir -p -- "$dir"',
            'tmp=$(mktemp -d "$dir/.vtool-put.XXXXXX")',
            "trap 'rm -rf \"$tmp\"' EXIT",
            'tar -x -f - -C "$tmp" --no-same-owner',
            'if [ -d "$dst" ] && [ ! -L "$dst" ]; then mv -T -- "$dst" "$tmp/old"; fi',
            # If the last step fails, the folder that was there is put back, not lost.
            'mv -Tf -- "$tmp/x" "$dst" || { if [ -e "$tmp/old" ]; then mv -T -- "$tmp/old" "$dst"; fi; exit 1; }',
            'echo "$dst"',
        ]
    )
