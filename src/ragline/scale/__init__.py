"""Scale-out on Ray: an index built and served in shards (``ragline index --ray``), searched through the same
retriever interface as a single index. Ray is imported only here and only when a sharded index is used."""
