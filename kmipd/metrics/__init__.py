"""What the daemon counts while it serves: plain counters and histograms, cheap on the hot path.

The server and the service bump them; `kmipd.daemon` exposes them to Prometheus.
"""

from kmipd.metrics._counters import LATENCY_BUCKETS, Histogram, MeasuredHsm, ServerMetrics

__all__ = ["LATENCY_BUCKETS", "Histogram", "MeasuredHsm", "ServerMetrics"]
