"""Training and evaluation data for the embedded tiny DSA model: an offline public-domain corpus, its BPE tokenizer,
and synthetic long-range retrieval documents built on top of it (see :mod:`.corpus` and :mod:`.retrieval`)."""
