"""dna_stun: the STUN binding (RFC 8489) and TURN relay (RFC 8656) service, `dna-stun`.

``message``/``attributes``: our codec; ``core``: the sans-I/O server; ``service``: the asyncio
adapter and operator endpoints; ``config``: its settings. See docs/nat.md."""
