"""The INDEXCACHE attention backend: per-step metadata, the sparse MLA backend and the lightning-indexer backend."""
