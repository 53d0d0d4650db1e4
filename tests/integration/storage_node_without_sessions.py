"""A storage node that serves no mailbox sessions and no ``SyncCompare``, as nodes from
before them: its ``Mailbox.Session`` and ``Mailbox.SyncCompare`` answer UNIMPLEMENTED;
everything else is today's node (run as a script by test_mailbox_repair_sessions.py with
the node's TOML, never imported by pytest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from dna_core.ops.config import load_config
from dna_core.ops.service import serve
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from dna_storage.cli import ENV_PREFIX
from dna_storage.mailbox_service import Ctx, MailboxService
from dna_storage.mailbox_stream import MailboxSessionService
from dna_storage.node import StorageNode, StorageNodeConfig


class WithoutSessions(MailboxSessionService):
    Session = MailboxService.Session  # UNIMPLEMENTED: "not served here"

    async def SyncCompare(  # noqa: N802 (gRPC method name)
        self, request: mailbox_pb2.SyncCompareRequest, context: Ctx
    ) -> mailbox_pb2.SyncCompareResponse:
        """What a node from before SyncCompare answers: gRPC's own UNIMPLEMENTED."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("abort returned")


class StorageNodeWithoutSessions(StorageNode):
    mailbox_service = WithoutSessions


def main() -> None:
    config = load_config(StorageNodeConfig, Path(sys.argv[1]), env_prefix=ENV_PREFIX)
    serve(StorageNodeWithoutSessions(config), config.log_level)


if __name__ == "__main__":
    main()
