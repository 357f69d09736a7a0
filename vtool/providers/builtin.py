"""The built-in providers, registered through the same hooks a third-party plugin uses.

Registration is kept apart from the providers themselves so that a command that needs no
provider (``vtool --help``, a usage error) never imports them: the factories import their
module on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl

# The `ec2:` settings with their defaults (README.md's config reference lists each).
EC2_DEFAULTS: dict[str, Any] = {
    "region": "",  # AWS region ("" = boto3's default: AWS_REGION / AWS_DEFAULT_REGION / ~/.aws/config)
    "aws_profile": "",  # named profile in ~/.aws for credentials ("" = boto3's default chain)
    "instance_type": "t3.micro",
    "ami": "",  # AMI id ("" = look up ami_ssm_parameter)
    "ami_ssm_parameter": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "user": "ubuntu",  # login user on the instances
    "subnets": [],  # subnet ids to try in order when capacity runs out ([] = the default VPC)
    "root_volume_gb": 16,
    "encrypted": True,  # encrypt the root volume
    "spot": False,  # ask for spot instances
    "spot_max_price": "",  # highest spot price per hour ("" = the on-demand price)
    "iam_instance_profile": "",  # instance profile name to attach
    "ssh_cidr": "",  # who may SSH in ("" = your own public address /32, looked up)
    "ip_lookup_url": "https://checkip.amazonaws.com",  # answers with your public address (for ssh_cidr)
    "key_name": "",  # use this existing EC2 key pair instead of importing the cluster key
    "key_file": "",  # the private key of key_name
    "min_nodes": 0,  # accept a launch that got at least this many nodes (0 = all or nothing)
    "address": "public",  # which address vtool connects to: public | private
    "wait_running": 600,  # seconds to wait for new instances to be running
    "api_deadline": 300,  # seconds vtool keeps retrying a throttled or failing RunInstances
}


def _local(settings: Any) -> Any:
    from .local import LocalProvider

    return LocalProvider(settings)


def _ec2(settings: Any) -> Any:
    from .ec2 import Ec2Provider

    return Ec2Provider(settings)


@hookimpl
def vtool_register_providers(register: Callable[[str, Any], None]) -> None:
    register("local", _local)
    register("ec2", _ec2)


@hookimpl
def vtool_config_defaults() -> dict[str, Any]:
    return {"ec2": EC2_DEFAULTS}
