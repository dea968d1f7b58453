"""Looking at the live dataplane: inspect, explain, monitor, metrics."""
