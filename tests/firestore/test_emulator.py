"""Without the emulator JAR (or java) the Firestore tests skip with a reason naming the Debian
package. These tests need neither: they point every search path at nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinks.firestore import emulator as fsemu

PACKAGE = "google-cloud-cli-firestore-emulator"
ROOT = Path(__file__).resolve().parents[2]
SINK_TESTS = "tests/firestore/test_firestore_sink.py"


@pytest.fixture
def no_jar(monkeypatch, tmp_path):
    monkeypatch.setenv("FIRESTORE_EMULATOR_JAR", str(tmp_path / "absent.jar"))
    monkeypatch.setattr(fsemu, "JAR_PATTERNS", (str(tmp_path / "nowhere" / "*.jar"),))
    return tmp_path


def test_missing_jar_names_the_debian_package(no_jar):
    assert fsemu.find_jar() is None
    reason = fsemu.missing()
    assert reason is not None and PACKAGE in reason and "FIRESTORE_EMULATOR_JAR" in reason
    with pytest.raises(RuntimeError, match=PACKAGE):
        fsemu.Emulator().start()


def test_missing_java_names_the_debian_package(no_jar, monkeypatch):
    monkeypatch.setenv("JAVA", str(no_jar / "no-java"))
    reason = fsemu.missing()
    assert reason is not None and "java" in reason and PACKAGE in reason


def test_jar_from_the_environment_is_found(no_jar, monkeypatch):
    jar = no_jar / "cloud-firestore-emulator.jar"
    jar.write_bytes(b"PK")
    monkeypatch.setenv("FIRESTORE_EMULATOR_JAR", str(jar))
    assert fsemu.find_jar() == str(jar)


def test_firestore_tests_skip_naming_the_package(no_jar):
    """A real pytest run of a Firestore test with no JAR to be found (a plugin module empties
    the search paths): skipped, not failed, and the reason names the package."""
    (no_jar / "no_emulator_jar.py").write_text(
        "from sinks.firestore import emulator\nemulator.JAR_PATTERNS = ()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(no_jar), str(ROOT)]),
           "FIRESTORE_EMULATOR_JAR": str(no_jar / "absent.jar")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p",
         "no_emulator_jar", f"{SINK_TESTS}::test_readyz_and_collection_prefix"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and PACKAGE in result.stdout
