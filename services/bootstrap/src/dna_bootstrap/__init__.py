"""dna_bootstrap: well-known entry points of the DNA overlay (overlay RPCs, peer hand-out)."""
