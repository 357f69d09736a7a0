"""The EC2 provider against a real moto server over HTTP (through a fault-injecting proxy)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import Aws, wait_for


def _sg_rules(aws: Aws, cluster: str) -> list[dict]:  # type: ignore[type-arg]
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=aws.moto.url, region_name="us-east-1",  # type: ignore[attr-defined]
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag:vtool:cluster", "Values": [cluster]}])
    return groups["SecurityGroups"]


def _keys(aws: Aws, cluster: str) -> list[dict]:  # type: ignore[type-arg]
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=aws.moto.url, region_name="us-east-1",  # type: ignore[attr-defined]
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    return ec2.describe_key_pairs(Filters=[{"Name": "tag:vtool:cluster", "Values": [cluster]}])["KeyPairs"]


def test_launch_three_in_one_call_tagged_and_locked_down(aws: Aws) -> None:
    r = aws.env.ok("launch", "3", "--no-wait")
    assert aws.proxy.counts["RunInstances"] == 1  # type: ignore[attr-defined]
    insts = aws.instances(vtool__cluster="default")
    assert len(insts) == 3
    assert sorted(int(i["TagMap"]["vtool:index"]) for i in insts) == [0, 1, 2]
    assert {i["TagMap"]["Name"] for i in insts} == {"default-0", "default-1", "default-2"}
    assert all(i["TagMap"]["vtool:owner"].startswith("arn:aws:") for i in insts)
    assert len({i["TagMap"]["vtool:launch"] for i in insts}) == 1
    assert all(i["MetadataOptions"]["HttpTokens"] == "required" for i in insts)
    assert "3 node(s)" in r.stdout and r.stdout.count(" running ") == 3
    groups = _sg_rules(aws, "default")
    assert len(groups) == 1
    ssh = [p for p in groups[0]["IpPermissions"] if p.get("FromPort") == 22]
    assert ssh and all(rng["CidrIp"] == "203.0.113.7/32" for p in ssh for rng in p["IpRanges"])
    assert not any(rng["CidrIp"] == "0.0.0.0/0" for p in groups[0]["IpPermissions"] for rng in p.get("IpRanges", []))
    inside = [p for p in groups[0]["IpPermissions"] if p.get("IpProtocol") == "-1"]
    assert inside and inside[0]["UserIdGroupPairs"][0]["GroupId"] == groups[0]["GroupId"]
    assert len(_keys(aws, "default")) == 1


def test_tags_are_the_truth_and_terminate_touches_only_this_cluster(aws: Aws) -> None:
    aws.env.ok("launch", "3", "--no-wait")
    aws.env.ok("launch", "1", "--no-wait", "-c", "other")
    shutil.rmtree(aws.env.vhome)  # the laptop's state is gone
    doc = json.loads(aws.env.ok("status", "--json", "-c", "default").stdout)
    assert [n["index"] for n in doc[0]["nodes"]] == [0, 1, 2]
    assert {c["cluster"] for c in json.loads(aws.env.ok("status", "--json").stdout)} == {"default", "other"}
    aws.env.ok("launch", "2", "--no-wait")
    insts = aws.instances(vtool__cluster="default")
    assert sorted(int(i["TagMap"]["vtool:index"]) for i in insts) == [0, 1, 2, 3, 4]
    r = aws.env.ok("terminate", "--yes")
    assert "terminated 5 node(s)" in r.stdout
    assert {i["State"]["Name"] for i in aws.instances(vtool__cluster="default")} == {"terminated"}
    assert [i["State"]["Name"] for i in aws.instances(vtool__cluster="other")] == ["running"]
    assert _sg_rules(aws, "default") == [] and _keys(aws, "default") == []
    assert len(_sg_rules(aws, "other")) == 1
    again = aws.env.ok("terminate", "--yes")
    assert "nothing to terminate" in again.stdout


def test_throttling_is_retried_with_the_same_client_token(aws: Aws) -> None:
    aws.proxy.add("RunInstances", "throttle", times=2)  # type: ignore[attr-defined]
    r = aws.env.ok("launch", "2", "--no-wait")
    assert aws.proxy.counts["RunInstances"] == 3  # type: ignore[attr-defined]
    assert "retrying" in r.stderr and "same client token" in r.stderr
    assert len(aws.instances(vtool__cluster="default")) == 2


def test_a_lost_response_never_doubles_the_nodes(aws: Aws) -> None:
    aws.proxy.add("RunInstances", "lost")  # type: ignore[attr-defined]
    aws.env.ok("launch", "3", "--no-wait")
    assert len(aws.instances(vtool__cluster="default")) == 3


def test_instances_not_visible_at_once_are_waited_for(aws: Aws) -> None:
    aws.proxy.add("DescribeInstances", "not_found", times=2)  # type: ignore[attr-defined]
    aws.env.ok("launch", "2", "--no-wait")
    insts = aws.instances(vtool__cluster="default")
    assert sorted(int(i["TagMap"]["vtool:index"]) for i in insts) == [0, 1]


def test_capacity_moves_to_the_next_subnet_then_fails_clearly(aws: Aws) -> None:
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=aws.moto.url, region_name="us-east-1",  # type: ignore[attr-defined]
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:2]
    env = {"VTOOL_EC2_SUBNETS": ",".join(subnets)}
    aws.proxy.add("RunInstances", "capacity")  # type: ignore[attr-defined]
    r = aws.env.cli("launch", "2", "--no-wait", extra_env=env)
    assert r.returncode == 0, r.stderr
    assert f"no capacity in {subnets[0]}: trying {subnets[1]}" in r.stderr
    assert {i["SubnetId"] for i in aws.instances(vtool__cluster="default")} == {subnets[1]}
    aws.proxy.add("RunInstances", "capacity", times=2)  # type: ignore[attr-defined]
    r = aws.env.cli("launch", "1", "--no-wait", extra_env=env)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines()[-1].startswith("vtool: InsufficientInstanceCapacity: AWS has no capacity")
    assert len(aws.instances(vtool__cluster="default")) == 2
    assert not (aws.env.vhome / "clusters" / "default" / "journal.json").exists()


def test_limits_and_permissions_are_one_line_errors(aws: Aws) -> None:
    for code, says in (("InstanceLimitExceeded", "instance limit is reached"),
                       ("UnauthorizedOperation", "may not do this")):
        aws.proxy.add("RunInstances", "error", code=code, status=400)  # type: ignore[attr-defined]
        r = aws.env.cli("launch", "1", "--no-wait")
        assert r.returncode == 3, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"vtool: {code}:") and says in last and "Traceback" not in r.stderr
    assert aws.instances(vtool__cluster="default") == []


def test_end_to_end_on_the_ec2_api_with_real_ssh(backed: Aws) -> None:
    """Launch on the EC2 API (moto), SSH to real sshd nodes: inject, run, scpgetall, terminate."""
    env = backed.env
    r = env.ok("launch", "4")
    assert "waiting for SSH: 4/4 ready" in r.stderr
    kh = (env.vhome / "clusters" / "default" / "known_hosts").read_text()
    # pinned at first contact: the keys the instances (here local sshd nodes) have
    backing = env.vhome / "clusters" / "bk-default" / "nodes"
    keys = {" ".join(p.read_text().split()[:2]) for p in backing.glob("*/ssh_host_*_key.pub")}
    pinned = {" ".join(line.split()[1:3]) for line in kh.splitlines() if line.startswith("vtool-default-")}
    assert len(keys) == 4 and pinned == keys
    import os
    import shutil

    from conftest import EXAMPLES

    pkg = env.root / "hello"
    shutil.copytree(EXAMPLES / "hello", pkg)
    (pkg / "data.bin").write_bytes(os.urandom(1_100_000))  # large enough to be relayed
    r = env.ok("inject", str(pkg))
    # Sent once by the client; the instances passed it on among themselves.
    assert r.stdout.count("package sent)") == 1 and r.stdout.count("package from another node)") == 3, r.stdout
    r = env.ok("run", "cat ~/.vtool/hosts | wc -l; echo $VTOOL_NODE_INDEX")
    assert "[1] 4" in r.stdout and "[1] 1" in r.stdout
    wait_for(lambda: env.cli("scpgetall", "hello-result.txt", "out/r").returncode == 0)
    for i in range(4):
        assert f"node_index={i}\n" in (env.work / "out" / f"r.{i}").read_text()
    env.ok("terminate", "--yes")
    assert {i["State"]["Name"] for i in backed.instances(vtool__cluster="default")} == {"terminated"}


def _interrupt_when(aws: Aws, action: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Start `vtool ARGS`, send SIGINT once ``action`` has reached the (delaying) proxy."""
    env = aws.env
    proc = subprocess.Popen([sys.executable, "-m", "vtool", *args], cwd=env.work, env=env.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: aws.proxy.counts[action] > 0 or proc.poll() is not None)  # type: ignore[attr-defined]
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _tracked(aws: Aws) -> tuple[set[str], set[str]]:
    """(instance ids that are alive in moto, instance ids `vtool status` lists)."""
    alive = {i["InstanceId"] for i in aws.instances() if i["State"]["Name"] not in ("terminated", "shutting-down")}
    doc = json.loads(aws.env.ok("status", "--json").stdout)
    return alive, {n["id"] for c in doc for n in c["nodes"]}


@pytest.mark.parametrize("point", ["before the call", "during the call", "right after it", "while waiting"])
def test_ctrl_c_never_leaves_an_untracked_instance(aws: Aws, point: str) -> None:
    action, args = {
        "before the call": ("DescribeImages", ["launch", "3"]),
        "during the call": ("RunInstances", ["launch", "3"]),
        "right after it": ("CreateTags", ["launch", "3"]),
        "while waiting": ("", ["launch", "3", "--ready-timeout", "300"]),
    }[point]
    if point == "while waiting":
        proc = subprocess.Popen([sys.executable, "-m", "vtool", *args], cwd=aws.env.work, env=aws.env.env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        seen = ""
        while "waiting for SSH on" not in seen:  # the instances run; vtool waits for SSH
            line = proc.stderr.readline()
            assert line, seen
            seen += line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        r = subprocess.CompletedProcess(args, proc.returncode, "", seen + err)
    else:
        aws.proxy.add(action, "delay", seconds=3)  # type: ignore[attr-defined]
        r = _interrupt_when(aws, action, *args)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "vtool terminate -c default --yes" in r.stderr
    if point == "during the call":  # the request went on without us: its instances appear, tagged
        wait_for(lambda: len(aws.instances(vtool__cluster="default")) == 3)
    alive, listed = _tracked(aws)
    assert alive == listed
    assert len(alive) == (0 if point == "before the call" else 3)
    # Running launch again resumes an interrupted launch instead of making more instances.
    again = aws.env.ok("launch", "3", "--no-wait")
    alive, listed = _tracked(aws)
    assert alive == listed
    if point in ("during the call", "right after it"):  # the journal was still open
        assert "resuming interrupted launch" in again.stderr and len(alive) == 3
    else:  # nothing made yet, or the launch had completed on EC2's side: a new launch
        assert len(alive) == (3 if point == "before the call" else 6)


def test_unready_nodes_are_terminated_unless_kept(aws: Aws) -> None:
    r = aws.env.cli("launch", "2", "--ready-timeout", "3")
    assert r.returncode == 1 and "did not accept SSH within 3s" in r.stderr
    assert {i["State"]["Name"] for i in aws.instances(vtool__cluster="default")} == {"terminated"}
    r = aws.env.cli("launch", "1", "--ready-timeout", "3", "--keep-unready")
    assert "keeping 1 node(s) that never accepted SSH" in r.stderr
    alive = [i for i in aws.instances(vtool__cluster="default") if i["State"]["Name"] == "running"]
    assert len(alive) == 1
    doc = json.loads(aws.env.ok("status", "--json").stdout)
    node = doc[0]["nodes"][0]
    assert (node["instance_type"], node["lifecycle"], node["reachable"]) == ("t3.micro", "on-demand", False)
    assert node["zone"].startswith("us-east-1")


def test_spot_and_settings_reach_run_instances(aws: Aws) -> None:
    aws.env.ok("launch", "1", "--no-wait", "--spot", extra_env={"VTOOL_EC2_INSTANCE_TYPE": "c5.large"})
    (inst,) = aws.instances(vtool__cluster="default")
    assert inst["InstanceType"] == "c5.large" and inst.get("InstanceLifecycle") == "spot"
    doc = json.loads(aws.env.ok("status", "--json").stdout)
    assert doc[0]["nodes"][0]["lifecycle"] == "spot"


def test_credentials_never_reach_disk_or_nodes(backed: Aws) -> None:
    canary = "vtool-canary-SECRET-3f9a1c"
    env = backed.env
    env.env["AWS_SECRET_ACCESS_KEY"] = canary  # moto accepts any secret
    env.ok("launch", "2", "--no-wait")
    from conftest import EXAMPLES

    env.ok("inject", str(EXAMPLES / "hello"))  # waits for the --no-wait nodes itself
    env.ok("run", "env > env.txt")
    leaks = []
    for path in env.vhome.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if canary.encode() in path.read_bytes():
                    leaks.append(str(path))
            except OSError:
                pass
    assert not leaks, f"the AWS secret was written to {leaks}"
    assert "AWS_SECRET" not in (env.vhome / "clusters" / "bk-default" / "nodes" / "0" / "home" / "env.txt").read_text()


def test_a_changed_host_key_is_refused(backed: Aws) -> None:
    env = backed.env
    env.ok("launch", "1")
    kh = env.vhome / "clusters" / "default" / "known_hosts"
    pinned = kh.read_text()
    key = env.vhome / "clusters" / "bk-default" / "nodes" / "0" / "ssh_host_ecdsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(env.root / "other")], check=True)
    # The instance now presents another host key (as a man in the middle would).
    shutil.copy(env.root / "other", key)
    shutil.copy(env.root / "other.pub", key.with_suffix(".pub"))
    env.ok("stop")  # and start again: the instance comes back with another key
    r = env.cli("start")
    assert r.returncode == 1 and "does not match the key pinned for vtool-default-0" in r.stderr
    r = env.cli("run", "true")
    assert r.returncode == 1 and "does not match the key pinned for vtool-default-0" in r.stderr
    assert kh.read_text() == pinned


def test_ssh_is_allowed_from_your_own_address_by_default(aws: Aws) -> None:
    import http.server
    import threading

    class Me(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"198.51.100.23\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Me)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"VTOOL_EC2_SSH_CIDR": "", "VTOOL_EC2_IP_LOOKUP_URL": f"http://127.0.0.1:{server.server_address[1]}/"}
        r = aws.env.cli("launch", "1", "--no-wait", extra_env=env)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert "allowing SSH from 198.51.100.23/32 (your public address" in r.stderr
    (group,) = _sg_rules(aws, "default")
    ssh = [rng["CidrIp"] for p in group["IpPermissions"] if p.get("FromPort") == 22 for rng in p["IpRanges"]]
    assert ssh == ["198.51.100.23/32"]


def test_security_group_still_in_use_is_retried(aws: Aws) -> None:
    aws.env.ok("launch", "1", "--no-wait")
    aws.proxy.add("DeleteSecurityGroup", "error", code="DependencyViolation", status=400)  # type: ignore[attr-defined]
    aws.env.ok("terminate", "--yes")
    assert aws.proxy.counts["DeleteSecurityGroup"] == 2  # type: ignore[attr-defined]
    assert _sg_rules(aws, "default") == []
