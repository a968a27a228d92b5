"""Google's Cloud Firestore emulator, run with ``java`` on 127.0.0.1 (tests and the benchmark).

The emulator ships as the Debian package ``google-cloud-cli-firestore-emulator`` (a JAR under the
Cloud SDK's ``platform/cloud-firestore-emulator/``); ``$FIRESTORE_EMULATOR_JAR`` points at
another copy. ``python -m sinks.firestore.emulator [--port N]`` runs one in the foreground.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

PACKAGE = "google-cloud-cli-firestore-emulator"
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
JAR_PATTERNS = (
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar",
    "/usr/share/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar",
    "/opt/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar",
    os.path.expanduser("~/google-cloud-sdk/platform/cloud-firestore-emulator/"
                       "cloud-firestore-emulator.jar"),
    os.path.expanduser("~/.cache/firebase/emulators/cloud-firestore-emulator-v*.jar"),
)


def find_jar() -> str | None:
    """The emulator JAR, or None when it is not installed."""
    candidates = [os.environ.get("FIRESTORE_EMULATOR_JAR", "")]
    for pattern in JAR_PATTERNS:
        candidates += sorted(glob.glob(pattern), reverse=True)
    return next((path for path in candidates if path and os.path.isfile(path)), None)


def missing() -> str | None:
    """Why the emulator cannot run here (None when it can)."""
    if shutil.which(os.environ.get("JAVA", "java")) is None:
        return f"java is not installed (the Firestore emulator, Debian package {PACKAGE}, needs it)"
    if find_jar() is None:
        return (f"the Firestore emulator JAR is not installed: apt-get install {PACKAGE} "
                "(or set FIRESTORE_EMULATOR_JAR)")
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Emulator:
    """One emulator process; ``host`` is the ``host:port`` to give ``emulator_host``."""

    def __init__(self, port: int | None = None, log_path: str | None = None) -> None:
        self.port = port or _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(
            tempfile.mkdtemp(prefix="firestore-emulator-"), "emulator.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> Emulator:
        """Start it and wait until it answers.

        Raises:
            RuntimeError: java or the JAR is missing, or the emulator did not come up.
        """
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        java = shutil.which(os.environ.get("JAVA", "java"))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [java, "-Duser.language=en", "-cp", find_jar(), MAIN_CLASS, "start",
                 "--host=127.0.0.1", f"--port={self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Firestore emulator exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Firestore emulator did not answer within {timeout:.0f} s")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def reset(self, project: str, database: str = "(default)") -> None:
        """Delete every document of one project's database."""
        url = f"http://{self.host}/emulator/v1/projects/{project}/databases/{database}/documents"
        with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30):
            pass

    def stop(self) -> None:
        """Stop the process by its pid (terminate, then kill)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the Firestore emulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8086)
    args = parser.parse_args()
    with Emulator(args.port) as emulator:
        print(f"FIRESTORE_EMULATOR_HOST={emulator.host}  (Ctrl-C stops it)", flush=True)
        try:
            emulator.proc.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
