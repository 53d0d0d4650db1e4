"""dna_stun: STUN binding (RFC 8489) and TURN relay (RFC 8656) service."""
