"""The admin API (FastAPI routes), its wire types and the client the CLI uses."""
