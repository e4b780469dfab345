"""The `cosmos` command line (installed as the package `cosmos_cli`)."""
