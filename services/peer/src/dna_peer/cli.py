"""`dna`: the command line for a person.

    dna identity create --name alice      a new identity, published to the network
    dna identity show | export [--private] | import FILE | publish
    dna identity link                     on this device: print a one-time code
    dna identity link CODE                on a new device: become a device of that identity
    dna identity rotate [--reason TEXT]   a new key set; contacts and your devices follow
    dna contacts add bob | list | verify bob [--confirm] | forget bob
    dna send bob "hello"
    dna inbox [bob]                       sync, then show conversations (or one of them)
    dna watch                             print messages as they arrive
    dna sync                              fetch the mailbox, with a progress bar
    dna search WORDS                      full-text search in the local cache

The profile lives in $DNA_HOME (default ~/.dna), the passphrase comes from a
prompt or $DNA_PASSPHRASE, the network from --bootstrap or $DNA_BOOTSTRAP
(default: the local testnet of `dna-testnet up`). `--json` prints one JSON
document per command (one per message for `watch`) for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dna_core import __version__
from dna_core.crypto import Identity, keystore
from dna_core.errors import DnaError
from dna_core.overlay.records import normalize_name

from dna_peer.cache import Cache, Contact, Message
from dna_peer.inbox import SyncReport
from dna_peer.keyserver import (
    DISPLAY_NAME_MAX,
    NameTakenError,
    check_display_name,
    check_name_free,
)
from dna_peer.link import accept_link, offer_link
from dna_peer.network import default_seeds, join_overlay, parse_seeds
from dna_peer.peer import Peer, open_peer
from dna_peer.profile import NoIdentityError, Profile, write_private

PASSPHRASE_ENV = "DNA_PASSPHRASE"
Info = dict[str, Any]


def _passphrase(confirm: bool) -> str:
    """From $DNA_PASSPHRASE (scripts) or a prompt (people)."""
    if PASSPHRASE_ENV in os.environ:
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise DnaError(f"no terminal to ask for a passphrase: set {PASSPHRASE_ENV}")
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise DnaError("the passphrases differ")
    return first


def _emit(args: argparse.Namespace, info: Info) -> None:
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v}")


def _with_peer(args: argparse.Namespace, work: Callable[[Peer], Awaitable[None]]) -> None:
    """Unlock, join the network, run ``work``, leave."""

    async def run() -> None:
        peer = await open_peer(args.profile, _passphrase(confirm=False), args.seeds)
        try:
            await work(peer)
        finally:
            await peer.close()

    asyncio.run(run())


# -- identity -----------------------------------------------------------------------


def _create(args: argparse.Namespace) -> None:
    """Every argument, the profile and the name are checked before anything is written,
    so a refused create leaves nothing behind and can simply be run again."""
    _check_publish_args(args)
    args.profile.ensure_absent()
    passphrase = _passphrase(confirm=True)
    if args.name and not args.offline:
        asyncio.run(_name_is_free(args.seeds, args.name))
    identity = Identity.generate()
    args.profile.create(identity, passphrase)
    info: Info = {"fingerprint": identity.fingerprint.hex(), "home": str(args.profile.home)}
    if args.offline:
        _emit(args, {**info, "published": False})
        return
    os.environ.setdefault(PASSPHRASE_ENV, passphrase)  # one prompt for create and publish
    try:
        _with_peer(args, lambda peer: _publish_as(args, peer, info))
    except NameTakenError as exc:  # claimed by someone else since the check above
        raise DnaError(f"{exc}; your identity was created without a name: pick one with "
                       "`dna identity publish --name`") from exc  # fmt: skip


def _publish(args: argparse.Namespace) -> None:
    _check_publish_args(args)
    _with_peer(args, lambda peer: _publish_as(args, peer, {}))


def _check_publish_args(args: argparse.Namespace) -> None:
    if args.name is not None:
        normalize_name(args.name)
    if args.display_name is not None:
        check_display_name(args.display_name)


async def _name_is_free(seeds: list[tuple[str, int]], name: str) -> None:
    node = await join_overlay(seeds)
    try:
        await check_name_free(node, name, None)
    finally:
        await node.stop()


async def _publish_as(args: argparse.Namespace, peer: Peer, info: Info) -> None:
    display = args.display_name or args.name or socket.gethostname()[:DISPLAY_NAME_MAX]
    stored = await peer.publish(display, args.name)
    info = {**info, "published_on": stored, "display_name": display}
    if args.name:
        info["name"] = normalize_name(args.name)
    _emit(args, info)


def _show(args: argparse.Namespace) -> None:
    if not args.profile.exists():
        raise NoIdentityError(f"no identity in {args.profile.home}: run `dna identity create`")
    keys = keystore.read_public(args.profile.keyfile.read_bytes())
    _emit(args, {"fingerprint": keys.fingerprint.hex(), "home": str(args.profile.home),
                 "device": args.profile.device().name})  # fmt: skip


def _export(args: argparse.Namespace) -> None:
    identity = args.profile.unlock(_passphrase(confirm=False))
    if args.private:  # the key file itself: still locked under the passphrase
        write_private(args.out, args.profile.keyfile.read_bytes())
    else:
        args.out.write_bytes(identity.public.encode())
    _emit(args, {"fingerprint": identity.fingerprint.hex(), "exported_to": str(args.out),
                 "private": args.private})  # fmt: skip


def _import(args: argparse.Namespace) -> None:
    identity = args.profile.restore(args.file.read_bytes(), _passphrase(confirm=False))
    _emit(args, {"fingerprint": identity.fingerprint.hex(), "home": str(args.profile.home)})


def _link(args: argparse.Namespace) -> None:
    if args.code:
        _accept(args)
        return

    async def work(peer: Peer) -> None:
        offer = await offer_link(peer, args.device_name)
        if not args.json:
            print(f"On the new device run:  dna identity link {offer.code}")
            print("The code works once, for an hour. Anyone with it becomes you: keep it secret.")
        _emit(args, {"code": offer.code, "device_id": offer.device_id.hex(),
                     "history_chunks": offer.history_chunks})  # fmt: skip

    _with_peer(args, work)


def _rotate(args: argparse.Namespace) -> None:
    """A new key set for this identity; contacts and the other devices follow."""

    async def work(peer: Peer) -> None:
        old = peer.fingerprint
        new = await peer.rotate(args.reason)
        _emit(args, {"old_fingerprint": old.hex(), "fingerprint": new.fingerprint.hex(),
                     "contacts_told": len([c for c in peer.cache.contacts()
                                           if c.replaced_by is None])})  # fmt: skip

    _with_peer(args, work)


def _accept(args: argparse.Namespace) -> None:
    async def run() -> None:
        peer = await accept_link(args.profile, args.code, _passphrase(confirm=True), args.seeds)
        try:
            report = await peer.sync()
            _emit(args, {"fingerprint": peer.fingerprint.hex(), "device": peer.device.name,
                         "messages": peer.cache.message_count(),
                         "new": len(report.new_messages)})  # fmt: skip
        finally:
            await peer.close()

    asyncio.run(run())


# -- contacts -----------------------------------------------------------------------


def _contact_info(peer: Peer, c: Contact) -> Info:
    return {"name": c.name, "fingerprint": c.fingerprint.hex(), "verified": c.verified,
            "safety_number": peer.safety_number(c)}  # fmt: skip


def _contacts_add(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        _emit(args, _contact_info(peer, await peer.add_contact(args.who)))

    _with_peer(args, work)


def _contacts_list(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        contacts = [_contact_info(peer, c) for c in peer.cache.contacts()]
        if args.json:
            print(json.dumps(contacts))
            return
        for c in contacts:
            mark = "verified" if c["verified"] else "unverified"
            print(f"{c['name'] or '(no name)':<20} {c['fingerprint'][:32]}…  {mark}")

    _with_peer(args, work)


def _contacts_verify(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        contact = await peer.refresh_contact(peer.find_contact(args.who))
        if args.confirm:
            peer.cache.set_verified(contact.fingerprint, True)
            contact = peer.cache.contact(contact.fingerprint) or contact
        elif not args.json:
            print("Compare this number with your contact (in person or on a call);")
            print(f"if it matches, run: dna contacts verify {args.who} --confirm")
        _emit(args, _contact_info(peer, contact))

    _with_peer(args, work)


def _contacts_forget(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        contact = peer.find_contact(args.who)
        peer.cache.forget_contact(contact.fingerprint)
        _emit(args, {"forgotten": contact.name or contact.fingerprint.hex()})

    _with_peer(args, work)


# -- messages -----------------------------------------------------------------------


def _send(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        contact = peer.find_contact(args.to)
        sent = await peer.send(contact, " ".join(args.text))
        _emit(args, {"to": contact.name or contact.fingerprint.hex(),
                     "message_id": sent.message_id.hex(), "replicas": sent.stored_on})  # fmt: skip

    _with_peer(args, work)


def _message_info(peer: Peer, m: Message) -> Info:
    return _message_info_from(peer.cache, m)


def _message_info_from(cache: Cache, m: Message) -> Info:
    other = cache.contact(m.recipient if m.outgoing else m.sender)
    name = (other.name if other else None) or (m.recipient if m.outgoing else m.sender).hex()[:16]
    return {"message_id": m.message_id.hex(), "from": "you" if m.outgoing else name,
            "to": name if m.outgoing else "you", "time_ms": m.timestamp_ms, "text": m.body,
            "delivered": m.delivered}  # fmt: skip


def _print_message(info: Info) -> None:
    when = datetime.datetime.fromtimestamp(info["time_ms"] / 1000).strftime("%Y-%m-%d %H:%M:%S")
    tick = " ✓" if info["delivered"] else ""
    print(f"[{when}] {info['from']} → {info['to']}: {info['text']}{tick}")


def _inbox(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        if not args.offline:
            await peer.sync()
        if args.contact:
            await _show_conversation(args, peer, peer.find_contact(args.contact))
        else:
            _show_conversations(args, peer)

    _with_peer(args, work)


async def _show_conversation(args: argparse.Namespace, peer: Peer, contact: Contact) -> None:
    messages = [_message_info(peer, m) for m in peer.cache.messages(contact.conversation)]
    if args.json:
        print(json.dumps(messages))
    else:
        for info in messages:
            _print_message(info)
    await peer.mark_read(contact)  # what was shown is read, on every device


def _show_conversations(args: argparse.Namespace, peer: Peer) -> None:
    rows = []
    for conv in peer.cache.conversations():
        contact = peer.cache.contact(conv.peer)
        last = peer.cache.messages(conv.id)[-1:] or None
        rows.append({"contact": (contact.name if contact else None) or conv.peer.hex()[:16],
                     "unread": conv.unread, "last": last and last[0].body})  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return
    if not rows:
        print("no conversations yet")
    for row in rows:
        print(f"{row['contact']:<20} {row['unread']:>3} unread   {row['last'] or ''}")


def _search(args: argparse.Namespace) -> None:
    identity = args.profile.unlock(_passphrase(confirm=False))
    cache = args.profile.open_cache(identity)  # the cache alone: no network needed
    try:
        found = [_message_info_from(cache, m)
                 for m in cache.search(" ".join(args.words))]  # fmt: skip
    finally:
        cache.close()
    if args.json:
        print(json.dumps(found))
    for info in [] if args.json else found:
        _print_message(info)


def _watch(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        def show(report: SyncReport) -> None:
            for m in report.new_messages:
                info = _message_info(peer, m)
                if args.json:
                    print(json.dumps(info), flush=True)
                else:
                    _print_message(info)

        if not args.json:
            print("watching for messages (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await peer.watch(show, interval=args.interval)

    with contextlib.suppress(KeyboardInterrupt):
        _with_peer(args, work)


def _sync(args: argparse.Namespace) -> None:
    def bar(done: int, total: int) -> None:
        if args.json or (not sys.stderr.isatty() and done != total):
            return
        filled = 30 * done // max(total, 1)
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} blobs", end="",
              file=sys.stderr, flush=True)  # fmt: skip
        if done == total:
            print(file=sys.stderr)

    async def work(peer: Peer) -> None:
        report = await peer.sync(progress=bar)
        _emit(args, {"new_messages": len(report.new_messages), "receipts": report.receipts,
                     "rejected": len(report.rejected), "deleted_from_network": report.deleted,
                     "messages_in_cache": peer.cache.message_count()})  # fmt: skip

    _with_peer(args, work)


def _demo(args: argparse.Namespace) -> None:
    from dna_peer.demo import run_demo

    run_demo()


# -- parser -------------------------------------------------------------------------


def _add(sub: Any, name: str, handler: Callable[[argparse.Namespace], None], text: str) -> Any:
    cmd = sub.add_parser(name, help=text, description=text)
    cmd.set_defaults(handler=handler)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dna", description="DNA Messenger v2 client.")
    parser.add_argument("--version", action="version", version=f"dna {__version__}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--home", type=Path, help="profile directory (default $DNA_HOME, ~/.dna)")
    parser.add_argument("--bootstrap", help="host:port[,host:port] (default $DNA_BOOTSTRAP or"
                        " the local testnet)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    ident = sub.add_parser("identity", help="your identity and devices").add_subparsers(
        dest="action", required=True
    )
    create = _add(ident, "create", _create, "create an identity and publish it")
    publish = _add(ident, "publish", _publish, "(re)publish your identity record and name")
    for cmd in (create, publish):
        cmd.add_argument("--name", help="a unique name others can find you by (proof of work)")
        cmd.add_argument("--display-name", help="shown to contacts (default: the name)")
    create.add_argument("--offline", action="store_true", help="do not publish yet")
    _add(ident, "show", _show, "show the fingerprint (no passphrase needed)")
    export = _add(ident, "export", _export, "write your public key set (or, with --private,"
                  " a backup of your locked key file)")  # fmt: skip
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--private", action="store_true", help="the locked key file, a backup")
    _add(ident, "import", _import, "start this device from a key file backup"
         ).add_argument("file", type=Path)  # fmt: skip
    link = _add(ident, "link", _link, "link a new device: without CODE print one, with it use it")
    link.add_argument("code", nargs="?", help="the code shown on your existing device")
    link.add_argument("--device-name", default="new device", help="name of the new device")
    rotate = _add(ident, "rotate", _rotate, "move to a new key set (contacts and your other"
                  " devices follow; the old mailbox is read for 30 more days)")  # fmt: skip
    rotate.add_argument("--reason", default="", help="said in the rotation statement")

    contacts = sub.add_parser("contacts", help="your contacts").add_subparsers(
        dest="action", required=True
    )
    _add(contacts, "add", _contacts_add, "find someone by name or fingerprint and pin their key"
         ).add_argument("who")  # fmt: skip
    _add(contacts, "list", _contacts_list, "list contacts")
    verify = _add(contacts, "verify", _contacts_verify, "show the safety number to compare")
    verify.add_argument("who")
    verify.add_argument("--confirm", action="store_true", help="it matched: mark verified")
    _add(contacts, "forget", _contacts_forget, "unpin a contact's key (history stays)"
         ).add_argument("who")  # fmt: skip

    send = _add(sub, "send", _send, "send a message")
    send.add_argument("to")
    send.add_argument("text", nargs="+")
    inbox = _add(sub, "inbox", _inbox, "sync and show conversations, or one conversation")
    inbox.add_argument("contact", nargs="?")
    inbox.add_argument("--offline", action="store_true", help="show the cache without syncing")
    watch = _add(sub, "watch", _watch, "print messages as they arrive")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between syncs")
    _add(sub, "sync", _sync, "fetch your mailbox now")
    _add(sub, "search", _search, "search your messages (offline)").add_argument("words", nargs="+")
    _add(sub, "demo", _demo, "run the in-process crypto demonstration")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.profile = Profile(args.home) if args.home else Profile.default()
    args.seeds = parse_seeds(args.bootstrap) if args.bootstrap else default_seeds()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="dna: %(levelname)s %(message)s")  # fmt: skip
    try:
        args.handler(args)
    except (DnaError, OSError) as exc:
        print(f"dna: error: {exc}", file=sys.stderr)
        sys.exit(1)
