"""A live service patched under load: ``hotpatch demo`` (see driver.py)."""
