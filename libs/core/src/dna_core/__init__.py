"""dna_core: the shared kernel of DNA Messenger v2.

Subpackages: ``crypto`` (the post-quantum hybrid suite), ``wire`` (protobuf
contracts and their validating codecs).
"""

__version__ = "2.0.0.dev0"
