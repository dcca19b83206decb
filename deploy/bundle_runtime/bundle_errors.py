"""The bundle runtime's one error type, apart from the modules that raise it (no circle of imports)."""


class BundleError(Exception):
    """A tampered, incomplete or unusable bundle, or a bad argument: one line, exit 2."""
