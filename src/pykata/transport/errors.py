"""The transports' two errors: an address that cannot be used, and failing to reach or serve one."""


class AddressError(ValueError):
    """An address that is malformed or names an unsupported form."""


class TransportError(ConnectionError):
    """Connecting, listening or the hybrid vsock handshake failed."""
