"""
What the master shows of the daemon to outside tools: StatusNet's UDP
monitor datagrams, statsd, Prometheus' /metrics, /status.json and a live
dashboard (L{snq.monitor.service.MonitorService}).  Everything is worked
out from the workers' reports, which reach the master over AMP once a
second, and from the queue's own count of what it holds.
"""
