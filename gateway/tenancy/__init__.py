"""Tenants, API keys, limits and the usage ledger (SQLite by default, Redis when configured)."""
