"""pykata.Extensions: the agent's own ttRPC service next to the upstream API
(protos/extensions.proto, docs/extensions.md), and what both ends of it share."""

#: The service's full name on the wire.
SERVICE = "pykata.Extensions"

#: Every extension (an RPC of the service) and its version.
EXTENSIONS = {
    "GetCapabilities": 1,
    "PortForward": 1,
    "Upload": 1,
    "Download": 1,
    "Exec": 1,
    "Watch": 1,
}
