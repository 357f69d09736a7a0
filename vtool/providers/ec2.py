"""The EC2 provider: instances made and found directly with boto3 (no CloudFormation).

The cloud's tags are the source of truth; nothing here depends on local state surviving:

* every instance and its volumes are tagged in the RunInstances call itself with
  ``vtool:cluster``, ``vtool:owner`` (the caller's AWS identity), ``vtool:launch`` (a batch
  id) and ``vtool:index-base``; an instance's stable index is ``vtool:index-base`` plus its
  ``AmiLaunchIndex`` (one RunInstances call cannot give N instances N different tags), and
  ``vtool:index`` / ``Name`` are added right after as a convenience;
* a launch journal (``$VTOOL_HOME/clusters/NAME/journal.json``) holds the launch id and its
  ClientToken before the call; a retried call or a re-run reuses them, and a re-run first
  looks for instances carrying the launch id, so nothing is created twice;
* ``terminate`` filters on the cluster *and* owner tags, never on an empty filter.

boto3 is imported lazily: ``vtool --help`` never loads it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, ProviderError
from ..models import Node, NodeResult, SshTarget
from ..state import ClusterPaths, ensure_client_key, read_json, write_json
from .base import Progress

NAME = "ec2"
TAG_CLUSTER = "vtool:cluster"
TAG_OWNER = "vtool:owner"
TAG_LAUNCH = "vtool:launch"
TAG_BASE = "vtool:index-base"
TAG_INDEX = "vtool:index"
LIVE = ["pending", "running", "stopping", "stopped"]
THROTTLING = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
}
CAPACITY = {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity"}


def _boto() -> Any:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise ProviderError("the EC2 provider needs boto3: pip install 'vtool[ec2]'") from None
    return boto3, botocore


def _tags(d: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in d.get("Tags", [])}


def _explain(e: Exception) -> ProviderError:
    """A one-line, actionable message for an AWS error."""
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
    msg = getattr(e, "response", {}).get("Error", {}).get("Message", str(e)) if hasattr(e, "response") else str(e)
    hints = {
        "UnauthorizedOperation": "your AWS identity may not do this; ask for ec2:RunInstances, ec2:Describe*, "
        "ec2:CreateTags, ec2:TerminateInstances, ec2:*SecurityGroup*, ec2:*KeyPair* permissions",
        "InstanceLimitExceeded": "your account's instance limit is reached; terminate instances or request a higher "
        "limit (Service Quotas, EC2 On-Demand instances)",
        "VcpuLimitExceeded": "your account's vCPU limit is reached; terminate instances or request a higher limit "
        "(Service Quotas, EC2 On-Demand instances)",
        "InsufficientInstanceCapacity": "AWS has no capacity for this instance type in the zones tried; add subnets "
        "in other zones to ec2.subnets or choose another ec2.instance_type",
        "AuthFailure": "AWS refused the credentials; check `aws sts get-caller-identity`",
    }
    if code in hints:
        return ProviderError(f"{code}: {hints[code]}")
    if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return ProviderError(
            "no AWS credentials found: configure them (`aws configure`, AWS_PROFILE or ec2.aws_profile)"
        )
    if type(e).__name__ == "NoRegionError":
        return ProviderError("no AWS region set: set ec2.region in vtool.yaml or AWS_REGION")
    if type(e).__name__ == "EndpointConnectionError":
        return ProviderError(f"cannot reach the EC2 API ({e})")
    return ProviderError(f"EC2 API error{f' {code}' if code else ''}: {msg}")


class Journal:
    """Launches under way, written before RunInstances so a crash or Ctrl-C is recoverable."""

    def __init__(self, paths: ClusterPaths) -> None:
        self.path = paths.root / "journal.json"

    def load(self) -> dict[str, Any] | None:
        data = read_json(self.path, None)
        return data if isinstance(data, dict) and data.get("launch") else None

    def begin(self, base: int, count: int) -> dict[str, Any]:
        entry = {
            "launch": f"l-{secrets.token_hex(6)}",
            "client_token": secrets.token_hex(16),
            "base": base,
            "count": count,
            "started": time.time(),
        }
        write_json(self.path, entry)
        return entry

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


class Ec2Provider:
    """EC2 instances as nodes. See the module docstring."""

    name = NAME

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.cfg = dict(settings.section("ec2"))
        self.home = settings.home
        self._ec2: Any = None
        self._session: Any = None
        self._owner: str | None = None

    # -- API plumbing -----------------------------------------------------------------------
    def _client(self, service: str, max_attempts: int = 8) -> Any:
        boto3, botocore = _boto()
        if self._session is None:
            try:
                self._session = boto3.session.Session(
                    profile_name=self.cfg["aws_profile"] or None, region_name=self.cfg["region"] or None
                )
            except Exception as e:  # ProfileNotFound and the like
                raise ProviderError(f"AWS session: {e}") from None
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts}, connect_timeout=10, read_timeout=60
        )
        try:
            return self._session.client(service, config=config)
        except Exception as e:
            raise _explain(e) from None

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = self._client("ec2")
        return self._ec2

    def call(self, method: str, **kw: Any) -> Any:
        """One EC2 API call; botocore retries throttling; errors become one actionable line."""
        _, botocore = _boto()
        try:
            return getattr(self.ec2, method)(**kw)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise _explain(e) from None

    def owner(self) -> str:
        """The caller's AWS identity (ARN): instances are tagged and filtered with it."""
        if self._owner is None:
            _, botocore = _boto()
            try:
                self._owner = str(self._client("sts").get_caller_identity()["Arn"])
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                raise _explain(e) from None
        return self._owner

    def _describe(self, filters: list[dict[str, Any]], ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kw: dict[str, Any] = {"Filters": filters}
        if ids:
            kw["InstanceIds"] = list(ids)
        token = None
        while True:
            if token:
                kw["NextToken"] = token
            page = self.call("describe_instances", **kw)
            for res in page.get("Reservations", []):
                out.extend(res.get("Instances", []))
            token = page.get("NextToken")
            if not token:
                return out

    def _ours(self, cluster: str | None = None, states: Sequence[str] = LIVE) -> list[dict[str, Any]]:
        filters = [
            {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner()]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
        filters.append(
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}
            if cluster
            else {"Name": "tag-key", "Values": [TAG_CLUSTER]}
        )
        return self._describe(filters)

    # -- the provider contract --------------------------------------------------------------
    def check(self) -> None:
        boto3, _ = _boto()
        if self.cfg["address"] not in ("public", "private"):
            raise ConfigError(f"ec2.address must be public or private, not {self.cfg['address']!r}")
        if bool(self.cfg["key_name"]) != bool(self.cfg["key_file"]):
            raise ConfigError(
                "set both ec2.key_name and ec2.key_file (an existing key pair and its private key), or neither"
            )
        self.owner()  # credentials and endpoint work

    def clusters(self) -> list[str]:
        return sorted({_tags(i).get(TAG_CLUSTER, "") for i in self._ours()} - {""})

    def _node(self, cluster: str, inst: dict[str, Any]) -> Node:
        tags = _tags(inst)
        if TAG_INDEX in tags and tags[TAG_INDEX].isdigit():
            index = int(tags[TAG_INDEX])
        else:
            index = int(tags.get(TAG_BASE, "0")) + int(inst.get("AmiLaunchIndex", 0))
        public = inst.get("PublicIpAddress", "")
        private = inst.get("PrivateIpAddress", "")
        address = public if self.cfg["address"] == "public" else private
        launched = inst.get("LaunchTime")
        return Node(
            cluster=cluster,
            index=index,
            id=inst["InstanceId"],
            provider=NAME,
            address=address or "",
            port=22,
            user=self.settings.ssh.user or self.cfg["user"],
            private_address=private or "",
            state=inst["State"]["Name"],
            launched_at=launched.timestamp() if launched is not None and hasattr(launched, "timestamp") else 0.0,
            extra=(
                ("instance_type", inst.get("InstanceType", "")),
                ("zone", inst.get("Placement", {}).get("AvailabilityZone", "")),
                ("lifecycle", "spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand"),
                ("launch", tags.get(TAG_LAUNCH, "")),
            ),
        )

    def nodes(self, cluster: str) -> list[Node]:
        found = [self._node(cluster, i) for i in self._ours(cluster)]
        return sorted(found, key=lambda n: n.index)

    def ssh_target(self, node: Node) -> SshTarget:
        paths = ClusterPaths(self.home, node.cluster)
        key = self.cfg["key_file"] or str(paths.key)
        return SshTarget(
            host=node.address,
            port=node.port,
            user=node.user,
            key_file=key,
            known_hosts=str(paths.known_hosts),
            host_key_alias=node.host_key_alias,
        )

    # -- launch -----------------------------------------------------------------------------
    def launch(self, cluster: str, indices: Sequence[int], progress: Progress, wait: bool = True) -> list[Node]:
        paths = ClusterPaths(self.home, cluster).create()
        journal = Journal(paths)
        entry = journal.load()
        if entry is not None:
            progress(f"resuming interrupted launch {entry['launch']} of {entry['count']} node(s)")
            ids = self._resume(cluster, entry, progress)
        else:
            ensure_client_key(paths)
            key_name = self._ensure_key(cluster, paths)
            vpc, subnets = self._network()
            group = self._ensure_group(cluster, vpc, progress)
            ami, root = self._ami()
            entry = journal.begin(indices[0], len(indices))
            ids = self._run(cluster, entry, key_name, group, subnets, ami, root, progress)
        self._tag_indices(cluster, ids, progress)
        nodes = self._wait_running(cluster, ids, progress) if wait else self._by_ids(cluster, ids)
        journal.done()
        return nodes

    def _by_ids(self, cluster: str, ids: Sequence[str]) -> list[Node]:
        if not ids:
            return []
        insts = self._describe([{"Name": f"tag:{TAG_OWNER}", "Values": [self.owner()]}], ids)
        return sorted((self._node(cluster, i) for i in insts), key=lambda n: n.index)

    def _resume(self, cluster: str, entry: dict[str, Any], progress: Progress) -> list[str]:
        """Find the instances of an interrupted launch by its tag (retrying briefly: a new
        instance may not be visible yet); the journal's ClientToken makes a repeated call safe."""
        deadline = time.monotonic() + 20
        while True:
            found = self._describe(
                [
                    {"Name": f"tag:{TAG_LAUNCH}", "Values": [entry["launch"]]},
                    {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner()]},
                    {"Name": "instance-state-name", "Values": LIVE},
                ]
            )
            if found or time.monotonic() > deadline:
                break
            time.sleep(2)
        if found:
            return [i["InstanceId"] for i in found]
        progress("the interrupted launch made no instance; launching again with the same client token")
        paths = ClusterPaths(self.home, cluster)
        key_name = self._ensure_key(cluster, paths)
        vpc, subnets = self._network()
        group = self._ensure_group(cluster, vpc, progress)
        ami, root = self._ami()
        return self._run(cluster, entry, key_name, group, subnets, ami, root, progress)

    def _run(
        self,
        cluster: str,
        entry: dict[str, Any],
        key_name: str,
        group: str,
        subnets: list[str | None],
        ami: str,
        root: str,
        progress: Progress,
    ) -> list[str]:
        count = int(entry["count"])
        tags = [
            {"Key": TAG_CLUSTER, "Value": cluster},
            {"Key": TAG_OWNER, "Value": self.owner()},
            {"Key": TAG_LAUNCH, "Value": entry["launch"]},
            {"Key": TAG_BASE, "Value": str(entry["base"])},
            {"Key": "Name", "Value": f"{cluster}-{entry['base']}+"},
        ]
        params: dict[str, Any] = {
            "ImageId": ami,
            "InstanceType": self.cfg["instance_type"],
            "MinCount": max(1, min(count, int(self.cfg["min_nodes"]) or count)),
            "MaxCount": count,
            "KeyName": key_name,
            "SecurityGroupIds": [group],
            "ClientToken": entry["client_token"],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [
                {
                    "DeviceName": root,
                    "Ebs": {
                        "VolumeSize": int(self.cfg["root_volume_gb"]),
                        "VolumeType": "gp3",
                        "Encrypted": bool(self.cfg["encrypted"]),
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
        }
        if self.cfg["iam_instance_profile"]:
            params["IamInstanceProfile"] = {"Name": self.cfg["iam_instance_profile"]}
        if self.cfg["spot"]:
            spot: dict[str, Any] = {"SpotInstanceType": "one-time"}
            if self.cfg["spot_max_price"]:
                spot["MaxPrice"] = str(self.cfg["spot_max_price"])
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        return self._run_with_retries(cluster, entry, params, subnets, progress)

    def _find_launch(self, entry: dict[str, Any]) -> list[str]:
        found = self._describe(
            [
                {"Name": f"tag:{TAG_LAUNCH}", "Values": [entry["launch"]]},
                {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner()]},
                {"Name": "instance-state-name", "Values": LIVE},
            ]
        )
        return [i["InstanceId"] for i in found]

    def _run_with_retries(
        self, cluster: str, entry: dict[str, Any], params: dict[str, Any], subnets: list[str | None], progress: Progress
    ) -> list[str]:
        """RunInstances, retried by vtool itself: throttling and server errors with backoff and
        the same ClientToken (so a retry never doubles the nodes), a lost response by first
        looking for the launch's instances, a capacity error by moving on to the next subnet."""
        _, botocore = _boto()
        client = self._client("ec2", max_attempts=1)
        deadline = time.monotonic() + float(self.cfg["api_deadline"])
        which, attempt = 0, 0
        journal = Journal(ClusterPaths(self.home, cluster))
        while True:
            subnet = subnets[which]
            params.pop("SubnetId", None)
            if subnet:
                params["SubnetId"] = subnet
            try:
                resp = client.run_instances(**params)
                return [i["InstanceId"] for i in resp["Instances"]]
            except botocore.exceptions.ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if code in CAPACITY:
                    if which + 1 < len(subnets):
                        progress(f"no capacity in {subnet or 'the default subnet'}: trying {subnets[which + 1]}")
                        which += 1
                        continue
                    if not self._find_launch(entry):
                        journal.done()
                    raise _explain(e) from None
                if code not in THROTTLING and status < 500:
                    if not self._find_launch(entry):
                        journal.done()  # refused: nothing was made, forget the launch
                    raise _explain(e) from None
                why = f"{code or status}"
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:
                found = self._find_launch(entry)  # the request may have gone through
                if found:
                    return found
                why = type(e).__name__
            attempt += 1
            pause = min(10.0, 0.5 * 2**attempt) * (0.5 + secrets.randbelow(1000) / 2000)
            if time.monotonic() + pause > deadline:
                raise ProviderError(
                    f"RunInstances kept failing ({why}) for {self.cfg['api_deadline']}s; "
                    f"nothing is lost: run `vtool launch` again to resume launch {entry['launch']}"
                )
            progress(f"EC2 answered {why}: retrying in {pause:.1f}s with the same client token")
            time.sleep(pause)

    def _tag_indices(self, cluster: str, ids: Sequence[str], progress: Progress) -> None:
        """Add vtool:index and Name per instance (the index is already derivable from tags)."""
        if not ids:
            return
        for inst in self._wait_visible(ids):
            node = self._node(cluster, inst)
            self.call(
                "create_tags",
                Resources=[inst["InstanceId"]],
                Tags=[{"Key": TAG_INDEX, "Value": str(node.index)}, {"Key": "Name", "Value": node.name}],
            )

    def _wait_visible(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Describe new instances, waiting while EC2 does not show them yet (eventual consistency)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                found = self._describe([], ids)
            except ProviderError as e:
                if "InvalidInstanceID.NotFound" not in str(e) or time.monotonic() > deadline:
                    raise
                found = []
            if len(found) >= len(ids) or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def _wait_running(self, cluster: str, ids: Sequence[str], progress: Progress) -> list[Node]:
        deadline = time.monotonic() + float(self.cfg["wait_running"])
        while True:
            nodes = [self._node(cluster, i) for i in self._wait_visible(ids)]
            ready = [n for n in nodes if n.state == "running" and n.address]
            progress(f"instances running: {len(ready)}/{len(ids)}")
            if len(ready) == len(ids):
                return sorted(nodes, key=lambda n: n.index)
            if any(n.state not in ("pending", "running") for n in nodes):
                bad = ", ".join(f"{n.index} ({n.state})" for n in nodes if n.state not in ("pending", "running"))
                raise ProviderError(f"instances stopped before running: {bad}; see the EC2 console")
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"instances not running after {self.cfg['wait_running']}s; they stay tagged in "
                    f"cluster {cluster!r}: `vtool status -c {cluster}`"
                )
            time.sleep(2)

    # -- what a cluster needs ------------------------------------------------------------------
    def _key_name(self, cluster: str) -> str:
        return f"vtool-{cluster}-{hashlib.sha256(self.owner().encode()).hexdigest()[:8]}"

    def _ensure_key(self, cluster: str, paths: ClusterPaths) -> str:
        """The EC2 key pair holding this machine's cluster key. Its name carries the key's
        fingerprint: after ~/.vtool is lost a new key is made, and new nodes get that one."""
        if self.cfg["key_name"]:
            return str(self.cfg["key_name"])
        material = paths.pubkey.read_bytes()
        name = f"{self._key_name(cluster)}-{hashlib.sha256(material.split()[1]).hexdigest()[:8]}"
        have = self.call("describe_key_pairs", Filters=[{"Name": "key-name", "Values": [name]}]).get("KeyPairs", [])
        if not have:
            self.call(
                "import_key_pair",
                KeyName=name,
                PublicKeyMaterial=material,
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": self._owned(cluster)}],
            )
        return name

    def _owned(self, cluster: str) -> list[dict[str, str]]:
        return [{"Key": TAG_CLUSTER, "Value": cluster}, {"Key": TAG_OWNER, "Value": self.owner()}]

    def _network(self) -> tuple[str, list[str | None]]:
        subnets = list(self.cfg["subnets"])
        if subnets:
            found = self.call("describe_subnets", SubnetIds=subnets)["Subnets"]
            vpcs = {s["VpcId"] for s in found}
            if len(vpcs) != 1:
                raise ConfigError("ec2.subnets must all be in one VPC")
            return vpcs.pop(), list(subnets)
        vpcs = self.call("describe_vpcs", Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ProviderError("this region has no default VPC: set ec2.subnets to subnets of your VPC")
        return vpcs[0]["VpcId"], [None]

    def _ssh_cidr(self, progress: Progress) -> str:
        cidr = str(self.cfg["ssh_cidr"])
        if cidr:
            if cidr in ("0.0.0.0/0", "::/0"):
                progress(f"warning: ec2.ssh_cidr {cidr} lets the whole internet try to log in over SSH")
            return cidr
        try:
            import urllib.request  # only here: it costs every command's start-up otherwise

            with urllib.request.urlopen(str(self.cfg["ip_lookup_url"]), timeout=5) as r:  # noqa: S310
                ip = r.read().decode().strip()
            ipaddress.ip_address(ip)
        except (OSError, ValueError):
            raise ProviderError(
                "could not find your public address to allow SSH from it; set ec2.ssh_cidr (e.g. 203.0.113.7/32)"
            ) from None
        progress(f"allowing SSH from {ip}/32 (your public address; set ec2.ssh_cidr to change)")
        return f"{ip}/32"

    def _ensure_group(self, cluster: str, vpc: str, progress: Progress) -> str:
        name = self._key_name(cluster)
        found = self.call(
            "describe_security_groups",
            Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}],
        )["SecurityGroups"]
        if found:
            return str(found[0]["GroupId"])
        cidr = self._ssh_cidr(progress)
        gid = self.call(
            "create_security_group",
            GroupName=name,
            VpcId=vpc,
            Description=f"vtool cluster {cluster}: SSH from {cidr}, all traffic inside the cluster",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": self._owned(cluster)}],
        )["GroupId"]
        self.call(
            "authorize_security_group_ingress",
            GroupId=gid,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": 22,
                    "ToPort": 22,
                    "IpRanges": [{"CidrIp": cidr, "Description": "vtool SSH"}],
                },
                {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid, "Description": "inside the cluster"}]},
            ],
        )
        return str(gid)

    def _ami(self) -> tuple[str, str]:
        ami = str(self.cfg["ami"])
        if not ami:
            param = str(self.cfg["ami_ssm_parameter"])
            _, botocore = _boto()
            try:
                ami = self._client("ssm").get_parameter(Name=param)["Parameter"]["Value"]
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                raise ProviderError(
                    f"could not look up the AMI in SSM parameter {param} ({_explain(e)}); set ec2.ami to an AMI id"
                ) from None
        images = self.call("describe_images", ImageIds=[ami]).get("Images", [])
        if not images:
            raise ConfigError(f"AMI {ami} was not found in this region; set ec2.ami")
        return ami, str(images[0].get("RootDeviceName") or "/dev/sda1")

    # -- tear-down ------------------------------------------------------------------------------
    def terminate(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        ids = [n.id for n in nodes]
        if not ids:
            return []
        # Re-check ownership from the tags themselves: never terminate what is not this cluster's.
        mine = {i["InstanceId"] for i in self._ours(cluster)}
        foreign = [n for n in nodes if n.id not in mine]
        targets = [n for n in nodes if n.id in mine]
        if targets:
            self.call("terminate_instances", InstanceIds=[n.id for n in targets])
            progress(f"terminating {len(targets)} instance(s)")
        deadline = time.monotonic() + float(self.cfg["wait_running"])
        left = {n.id for n in targets}
        while left and time.monotonic() < deadline:
            states = {i["InstanceId"]: i["State"]["Name"] for i in self._describe([], sorted(left))}
            left = {i for i, s in states.items() if s != "terminated"}
            if left:
                time.sleep(2)
        out = [
            NodeResult(n.index, n.id not in left, error=None if n.id not in left else "still shutting down")
            for n in targets
        ]
        out += [
            NodeResult(n.index, False, error=f"{n.id} is not tagged as this cluster's; not touched") for n in foreign
        ]
        return sorted(out, key=lambda r: r.index)

    # -- stop and start: keep the disks, stop paying for compute -------------------------------
    def _wait_state(self, cluster: str, nodes: Sequence[Node], state: str) -> list[NodeResult]:
        deadline = time.monotonic() + float(self.cfg["wait_running"])
        left = {n.id for n in nodes}
        while left and time.monotonic() < deadline:
            for inst in self._describe([], sorted(left)):
                if inst["State"]["Name"] == state:
                    left.discard(inst["InstanceId"])
            if left:
                time.sleep(2)
        return [
            NodeResult(n.index, n.id not in left, error=None if n.id not in left else f"not {state} in time")
            for n in nodes
        ]

    def _transition(
        self, cluster: str, nodes: Sequence[Node], progress: Progress, action: str, state: str, verb: str
    ) -> list[NodeResult]:
        """Stop or start this cluster's instances among ``nodes`` and wait for ``state``."""
        mine = {i["InstanceId"] for i in self._ours(cluster)}
        targets = [n for n in nodes if n.id in mine and n.state != state]
        if targets:
            self.call(action, InstanceIds=[n.id for n in targets])
            progress(f"{verb} {len(targets)} instance(s)")
        done = {r.index: r for r in self._wait_state(cluster, targets, state)}
        return [
            done.get(n.index, NodeResult(n.index, n.id in mine, error=None if n.id in mine else "not this cluster's"))
            for n in nodes
        ]

    def stop(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        return self._transition(cluster, nodes, progress, "stop_instances", "stopped", "stopping")

    def start(self, cluster: str, nodes: Sequence[Node], progress: Progress) -> list[NodeResult]:
        return self._transition(cluster, nodes, progress, "start_instances", "running", "starting")

    def forget(self, cluster: str) -> None:
        """Delete the security group and key pair vtool made for the cluster (retrying while
        AWS still counts them as in use)."""
        _, botocore = _boto()
        name = self._key_name(cluster)
        groups = self.call(
            "describe_security_groups",
            Filters=[{"Name": "group-name", "Values": [name]}, {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner()]}],
        )
        for g in groups["SecurityGroups"]:
            deadline = time.monotonic() + 300
            while True:
                try:
                    self.ec2.delete_security_group(GroupId=g["GroupId"])
                    break
                except botocore.exceptions.ClientError as e:
                    code = e.response.get("Error", {}).get("Code", "")
                    if code == "InvalidGroup.NotFound":
                        break
                    if code != "DependencyViolation" or time.monotonic() > deadline:
                        raise _explain(e) from None
                    time.sleep(2)  # the terminated instances still hold it for a while
        if not self.cfg["key_name"]:
            keys = self.call(
                "describe_key_pairs",
                Filters=[
                    {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
                    {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner()]},
                ],
            ).get("KeyPairs", [])
            for k in keys:
                self.call("delete_key_pair", KeyName=k["KeyName"])
