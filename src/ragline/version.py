"""ragline's version, in one place (what manifests and the MCP server report)."""

__version__ = "0.1.0"
