"""Every Prometheus metric (CONTRACT §6), defined once, on a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SINK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RESPONSE_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 14400, 86400)


class Metrics:
    """The gateway's metrics. One instance per app; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.webhook_requests = Counter(
            "gateway_webhook_requests_total", "Webhook POSTs by outcome.",
            ["channel", "outcome"], registry=r)
        self.webhook_ack = Histogram(
            "gateway_webhook_ack_seconds", "Time from request start to the 200 (journaled).",
            ["channel"], buckets=LATENCY_BUCKETS, registry=r)
        self.events = Counter(
            "gateway_events_total", "Canonical events produced (after de-duplication).",
            ["channel", "kind", "type"], registry=r)
        self.duplicate_events = Counter(
            "gateway_duplicate_events_total", "Events dropped as already processed.",
            ["channel"], registry=r)
        self.sink_deliveries = Counter(
            "gateway_sink_deliveries_total", "Events delivered to sinks by outcome.",
            ["sink", "outcome"], registry=r)
        self.sink_latency = Histogram(
            "gateway_sink_latency_seconds", "From webhook receipt to the sink having the event.",
            ["sink"], buckets=SINK_BUCKETS, registry=r)
        self.outbound_messages = Counter(
            "gateway_outbound_messages_total", "Outbound messages by outcome.",
            ["channel", "type", "outcome"], registry=r)
        self.response_time = Histogram(
            "gateway_response_time_seconds", "Customer message to first reply in the conversation.",
            ["channel"], buckets=RESPONSE_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "gateway_queue_depth", "Items waiting: journal = unprocessed requests, "
            "sink:<name> = events not yet delivered to that sink, outbox = messages not yet "
            "sent to Meta.", ["queue"], registry=r)
        self.dead_letters = Gauge(
            "gateway_dead_letters", "Events in the dead-letter store.", ["sink"], registry=r)
        self.ratelimit_headroom = Gauge(
            "gateway_ratelimit_headroom_ratio", "0 = exhausted, 1 = idle.",
            ["channel", "account", "scope"], registry=r)
        self.alerts = Gauge(
            "gateway_alerts", "1 while an operator must act (expired token, paused account, …).",
            ["channel", "account", "reason"], registry=r)
        self._intake: dict[str, tuple] = {}
        self.meta_errors = Counter(
            "gateway_meta_errors_total", "Meta's out-of-band account errors (WhatsApp's "
            "value-level errors[]), by code.", ["channel", "account", "code"], registry=r)
        self.normalise_failures = Counter(
            "gateway_normalise_failures_total", "Journaled requests a channel could not normalise.",
            ["channel"], registry=r)

    def intake(self, channel: str) -> tuple:
        """(accepted counter, ack histogram) of one channel, looked up once: the hot path."""
        found = self._intake.get(channel)
        if found is None:
            found = (self.webhook_requests.labels(channel, "accepted"),
                     self.webhook_ack.labels(channel))
            self._intake[channel] = found
        return found
