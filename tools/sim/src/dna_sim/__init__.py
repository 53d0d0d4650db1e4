"""dna_sim: a seeded, deterministic simulation of the DNA overlay."""
