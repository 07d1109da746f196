"""The `kintsugi` command, preflight checks, and starting torchrun's agent."""
