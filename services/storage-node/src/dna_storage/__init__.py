"""dna_storage: storage node holding replicated, encrypted mailbox blobs and signed records."""
