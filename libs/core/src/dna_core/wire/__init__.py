"""Wire contracts: generated protobuf stubs (``gen``, never edited by hand) and the
strict decoding helper every codec uses."""

from dna_core.wire.codec import decode_message, encode_message

__all__ = ["decode_message", "encode_message"]
