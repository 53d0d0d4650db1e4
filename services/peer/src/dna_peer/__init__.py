"""dna_peer: the client peer library (identities, keyserver, messaging) and the `dna` CLI."""
