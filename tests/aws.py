"""A real moto server (``python -m moto.server``) and a fault-injecting HTTP proxy in front of it.

moto is a good EC2 control plane but reproduces none of AWS's failures (see
shared/notes/moto.md). The proxy adds them, per action, on request:

* ``throttle``: HTTP 503 ``RequestLimitExceeded``;
* ``capacity``: HTTP 500 ``InsufficientInstanceCapacity``;
* ``error``: any code and status;
* ``lost``: the request reaches moto (instances are made), the response is dropped;
* ``not_found``: DescribeInstances by id answers ``InvalidInstanceID.NotFound`` (new
  instances not visible yet);
* ``delay``: the request waits ``seconds`` before it is forwarded (to interrupt vtool at a
  known point).

It also does what AWS does and moto does not: RunInstances with a ClientToken seen before
returns the first answer instead of making instances again. It counts every action.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>vtool-test</RequestID></Response>"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on a free port; stopped by PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=30).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.rules: list[dict[str, Any]] = []
        self.tokens: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, action: str, fault: str, times: int = 1, **kw: Any) -> None:
        """Inject ``fault`` into the next ``times`` calls of ``action``."""
        with self.lock:
            self.rules.append({"action": action, "fault": fault, "times": times, **kw})

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.counts.clear()
            self.tokens.clear()

    def take(self, action: str, params: dict[str, list[str]]) -> dict[str, Any] | None:
        with self.lock:
            for rule in self.rules:
                if rule["action"] != action or rule["times"] <= 0:
                    continue
                if rule["fault"] == "not_found" and not any(k.startswith("InstanceId.") for k in params):
                    continue
                rule["times"] -= 1
                return rule
        return None

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
        conn.close()
        return resp.status, out, data

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        params = urllib.parse.parse_qs(body.decode(errors="replace")) if body else {}
        action = (params.get("Action") or urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("Action")
                  or [self.headers.get("X-Amz-Target", "other")])[0]
        with self.server.lock:
            self.server.counts[action] += 1
        rule = self.server.take(action, params)
        token = (params.get("ClientToken") or [""])[0] if action == "RunInstances" else ""
        if token:
            with self.server.lock:
                cached = self.server.tokens.get(token)
            if cached is not None:
                self._send(*cached)
                return
        if rule is not None:
            fault = rule["fault"]
            if fault in ("throttle", "capacity", "error", "not_found"):
                code, status = {
                    "throttle": ("RequestLimitExceeded", 503),
                    "capacity": ("InsufficientInstanceCapacity", 500),
                    "not_found": ("InvalidInstanceID.NotFound", 400),
                }.get(fault, (rule.get("code", "InternalError"), rule.get("status", 500)))
                xml = ERROR_XML.format(code=code, message=f"injected by the test proxy: {fault}").encode()
                self._send(status, [("Content-Type", "text/xml")], xml)
                return
            if fault == "delay":
                time.sleep(float(rule.get("seconds", 5)))
            if fault == "lost":
                status, headers, data = self._forward(body)
                if token and status == 200:
                    with self.server.lock:
                        self.server.tokens[token] = (status, headers, data)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        status, headers, data = self._forward(body)
        if token and status == 200:
            with self.server.lock:
                self.server.tokens[token] = (status, headers, data)
        self._send(status, headers, data)

    do_POST = _handle
    do_GET = _handle
    do_PUT = _handle
    do_DELETE = _handle


def aws_env(endpoint: str) -> dict[str, str]:
    """Fake credentials and the endpoint: boto3 talks HTTP to the proxy, never to AWS."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def instances(endpoint: str, **filters: str) -> list[dict[str, Any]]:
    """Every instance moto holds (straight to moto, bypassing the proxy), with its tags as a dict."""
    import boto3

    env = aws_env(endpoint)
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    out = []
    for res in ec2.describe_instances()["Reservations"]:
        for i in res["Instances"]:
            i["TagMap"] = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
            if all(i["TagMap"].get(k.replace("__", ":")) == v for k, v in filters.items()):
                out.append(i)
    return out


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str, indent=1)
