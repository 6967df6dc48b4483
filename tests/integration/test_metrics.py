"""`cmuxd-remote status --prometheus` against a running daemon, read back with the Prometheus
client library's own parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cmuxd import __version__
from cmuxd.client import Client
from helpers import wait_for
from listening import RELAY_ID, ListeningDaemon, refused


@pytest.fixture
def daemon():
    d = ListeningDaemon()
    d.wait_ready()
    yield d
    d.close()


def scrape(daemon) -> dict[tuple[str, tuple], float]:
    out = daemon.cli("status", "--prometheus", "--state-dir", str(daemon.state_dir))
    assert out.returncode == 0, out.stderr
    samples = {}
    for family in text_string_to_metric_families(out.stdout.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_prometheus_text_carries_the_status_counters(daemon):
    daemon.authed().call("ping", id=1)
    bad = daemon.tcp_connect()
    daemon.challenge(bad)
    bad.sendall(b'{"mac":"00","relay_id":"nope"}\n')
    refused(bad)
    victim = daemon.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: daemon.status()["counters"].get("worker_restarts") == 1, timeout=15,
             message="the worker to be replaced")
    client = Client(f"127.0.0.1:{daemon.port}", token_file=str(daemon.token_file),
                    relay_id=RELAY_ID)
    try:
        client.rpc("pty.attach", {"session_id": "metrics", "attachment_id": "a",
                                  "client_attachment_token": "t" * 32, "cols": 80, "rows": 24,
                                  "command": "sleep 60"})
        wait_for(lambda: daemon.status()["pty_sessions"] == 1, timeout=15,
                 message="the hub to report the session")
        samples = scrape(daemon)
    finally:
        client.close()

    assert samples[("cmuxd_build_info", (("version", __version__),))] == 1
    assert samples[("cmuxd_uptime_seconds", ())] > 0
    assert samples[("cmuxd_pty_sessions", ())] == 1
    assert samples[("cmuxd_connections", ())] >= 1  # the client above is still open
    assert samples[("cmuxd_workers", (("state", "serving"),))] == 2
    assert samples[("cmuxd_worker_restarts_total", ())] == 1
    assert samples[("cmuxd_hub_restarts_total", ())] == 0
    assert samples[("cmuxd_authenticated_total", ())] >= 2
    assert samples[("cmuxd_accepted_total", ())] >= 3
    reasons = {dict(labels)["reason"]: value for (name, labels), value in samples.items()
               if name == "cmuxd_refused_total"}
    assert sum(reasons.values()) == daemon.status()["counters"]["refused"] >= 1


def test_prometheus_and_json_together_are_a_usage_error(daemon):
    out = daemon.cli("status", "--prometheus", "--json", "--state-dir", str(daemon.state_dir))
    assert out.returncode == 2
    assert b"choose one of --json and --prometheus" in out.stderr


def test_prometheus_without_a_daemon_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cmuxd", "status", "--prometheus",
                          "--state-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 3
    assert out.stdout == ""  # a textfile collector must not get half a file
    assert "no daemon answers" in out.stderr


@pytest.mark.parametrize("flag, imported", [("--json", False), ("--prometheus", True)])
def test_only_the_prometheus_command_imports_the_client_library(daemon, flag, imported):
    code = (
        "import sys\n"
        "import cmuxd.cli, cmuxd.supervisor.daemon, cmuxd.worker, cmuxd.hub_link\n"
        f"sys.argv = ['cmuxd-remote', 'status', '{flag}', '--state-dir', sys.argv[1]]\n"
        "try:\n    cmuxd.cli.main()\nexcept SystemExit as exc:\n    assert not exc.code\n"
        "print('prometheus_client' in sys.modules, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code, str(daemon.state_dir)],
                         capture_output=True, text=True, timeout=30, env=daemon.env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == str(imported)
