"""`cmuxd-remote status --prometheus`: the status object in the Prometheus text format, for
node_exporter's textfile collector.

prometheus_client is imported by this module alone, and only that command imports it: the
daemon and the other commands never pay for it.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

REFUSED_PREFIX = "refused_"


class StatusCollector:
    """One scrape of a status object; the values are the daemon's, not counted here."""

    def __init__(self, status: dict):
        self.status = status

    def collect(self):
        st = self.status
        counters = st.get("counters", {})
        yield InfoMetricFamily("cmuxd_build", "The version of the running daemon.",
                               value={"version": str(st["version"])})
        yield GaugeMetricFamily("cmuxd_uptime_seconds", "Seconds since the supervisor started.",
                                value=st["uptime"])
        yield GaugeMetricFamily("cmuxd_connections", "Open client connections.",
                                value=st.get("connections", 0))
        yield GaugeMetricFamily("cmuxd_handshakes_in_flight",
                                "Connections still in the relay handshake.",
                                value=st.get("handshakes_in_flight", 0))
        yield GaugeMetricFamily("cmuxd_pty_sessions", "PTY sessions the daemon holds.",
                                value=st.get("pty_sessions", 0))
        workers = GaugeMetricFamily("cmuxd_workers", "Worker processes by state.",
                                    labels=["state"])
        states = Counter(w["state"] for w in st.get("workers", []))
        for state in sorted(states.keys() | {"serving"}):
            workers.add_metric([state], states[state])
        yield workers
        for key, text in [("accepted", "Connections accepted."),
                          ("authenticated", "Connections that passed the handshake or peer "
                                            "check."),
                          ("worker_restarts", "Workers replaced after they exited or hung."),
                          ("hub_restarts", "PTY hubs replaced after they exited or hung.")]:
            yield CounterMetricFamily(f"cmuxd_{key}", text, value=counters.get(key, 0))
        refusals = CounterMetricFamily("cmuxd_refused", "Connections refused, by reason.",
                                       labels=["reason"])
        for key in sorted(counters):
            if key.startswith(REFUSED_PREFIX):
                refusals.add_metric([key[len(REFUSED_PREFIX):]], counters[key])
        yield refusals


def prometheus_text(status: dict) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry).decode()
