"""``gateway serve`` in a subprocess, for tests that need a real process (signals, crashes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gateway.testing.client import free_port, sign_headers, wait_http


class GatewayProcess:
    """Start, stop, kill and restart a gateway on free ports with a given TOML config.

    The config text may contain ``{port}``, ``{metrics_port}`` and ``{data_dir}``, filled in here.
    """

    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.port = free_port()
        self.metrics_port = free_port()
        self.config_path = self.workdir / "gateway.toml"
        self.config_path.write_text(config_text.format(
            port=self.port, metrics_port=self.metrics_port, data_dir=self.data_dir))
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        """Start and wait until ``/healthz`` answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/healthz", timeout)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"gateway did not start; log:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def post_webhook(self, channel: str, body: bytes, secret: str) -> int:
        """POST ``body`` to ``/webhooks/{channel}``, signed with ``secret`` as Meta signs it;
        the HTTP status."""
        req = urllib.request.Request(f"{self.url}/webhooks/{channel}", data=body,
                                     headers=sign_headers(secret, body), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
