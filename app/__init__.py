"""binner's application layer: configuration, ledger, engine wiring, CLI and daemon."""

__version__ = "0.1.0"
