"""Prometheus metrics of the image service (``ray.serve.metrics``; exported by each node's metrics agent).

Names (Ray prefixes ``ray_`` on export; Serve adds deployment, replica and application tags):

    scoreaction_requests_total{route, method, status}        answers of the ingress, every status
    scoreaction_request_latency_s{route}                     ingress latency (histogram)
    scoreaction_images_generated_total{model}                images produced by the model replicas
    scoreaction_batch_size                                   requests per model batch (histogram)
    scoreaction_requests_cancelled_total                     requests whose generation stopped early
                                                             (timed out or the client went away)
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]


class IngressMetrics:
    """Created in the ingress replica; the guard middleware reports every answer through observe()."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "scoreaction_requests_total",
            description="HTTP answers of the ingress by route, method and status.",
            tag_keys=("route", "method", "status"),
        )
        self.latency = metrics.Histogram(
            "scoreaction_request_latency_s",
            description="Ingress latency in seconds by route.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("route",),
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


class ModelMetrics:
    """Created in each model replica."""

    def __init__(self) -> None:
        self.generated = metrics.Counter(
            "scoreaction_images_generated_total",
            description="Images generated, by model id.",
            tag_keys=("model",),
        )
        self.batch_size = metrics.Histogram(
            "scoreaction_batch_size",
            description="Requests per model batch.",
            boundaries=BATCH_BOUNDARIES,
        )
        self.cancelled_requests = metrics.Counter(
            "scoreaction_requests_cancelled_total",
            description="Requests whose generation stopped before it finished (timeout, client gone).",
        )

    def images(self, model: str, count: int) -> None:
        self.generated.inc(count, tags={"model": model})

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def cancelled(self, count: int) -> None:
        self.cancelled_requests.inc(count)
