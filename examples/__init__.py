"""Examples, installed as ``hotpatch.examples`` so that ``hotpatch demo`` finds them."""
