"""dna_stun: the STUN binding (RFC 8489) and TURN relay (RFC 8656) service to come.

Today it serves nothing: ``dna-stun keygen`` mints a node key, like every service's CLI."""
