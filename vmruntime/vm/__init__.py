"""vm: arrives with a later issue (see docs/architecture.md)."""
