"""HTTP API and web page (ragline serve)."""
