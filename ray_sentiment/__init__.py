"""The ``sentiment`` command's entry point, above the core (`sentiment`) and the Ray adapters."""
