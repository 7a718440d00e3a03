"""kata-trace-forwarder: the agent's spans to an OpenTelemetry collector or a file."""
