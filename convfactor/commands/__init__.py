"""One module per CLI command (see convfactor/cli.py)."""
