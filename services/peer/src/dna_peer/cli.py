"""`dna`: the command line for a person.

    dna identity create --name alice      a new identity, published to the network
    dna identity show | export [--private --out FILE] | import FILE | publish
    dna identity link                     on this device: print a one-time code
    dna identity link CODE                on a new device: become a device of that identity
    dna identity rotate [--reason TEXT]   a new key set; contacts and your devices follow
    dna contacts add bob | list [--online] | verify bob [--confirm] [--online] | forget bob
    dna send bob "hello"                  (or `-` / a pipe for stdin, or --file FILE)
    dna inbox [bob]                       sync, then show conversations (or one of them)
    dna watch                             print messages as they arrive
    dna sync                              fetch the mailbox, with a progress bar
    dna search WORDS                      full-text search in the local cache

The profile lives in $DNA_HOME (default ~/.dna), the passphrase comes from a
prompt or $DNA_PASSPHRASE, the network from --bootstrap or $DNA_BOOTSTRAP
(default: the local testnet of `dna-testnet up`). `--json` prints one JSON
document per command (one per message for `watch`) for scripts; the global options
go before or after the command. All failures pass through one handler (`_run`): one
line on stderr, or a JSON object under --json, and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import difflib
import getpass
import json
import logging
import math
import os
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from dna_core import __version__
from dna_core.crypto import Identity, keystore
from dna_core.errors import DnaError, MalformedError
from dna_core.files import write_atomic
from dna_core.mailbox import UnreachableError
from dna_core.ops.heap import freeze_startup_heap
from dna_core.overlay import normalize_name
from rich.text import Text

from dna_peer.armor import LOCKED_KEY_FILE, PUBLIC, armor, dearmor, is_armored
from dna_peer.cache import RECOVERING, Cache, Contact, Message
from dna_peer.inbox import MAX_STRANGERS, SyncReport
from dna_peer.keyserver import (
    DISPLAY_NAME_MAX,
    NameTakenError,
    check_display_name,
    check_name_free,
    safety_number,
)
from dna_peer.link import accept_link, normalize_code, offer_link
from dna_peer.network import (
    NetworkUnreachableError,
    default_seeds,
    direct_enabled,
    ice_config,
    join_overlay,
    parse_seeds,
)
from dna_peer.peer import (
    DIRECT,
    MAX_TEXT_BYTES,
    InvalidMessageError,
    Peer,
    check_text,
    find_contact,
    open_peer,
)
from dna_peer.profile import BACKUP_MAX_BYTES, Profile, read_bounded
from dna_peer.terminal import (
    console,
    phase_line,
    printable,
    progress_bar,
    quiet_broken_pipe,
    table,
)

PASSPHRASE_ENV = "DNA_PASSPHRASE"
MAX_STRANGERS_ENV = "DNA_MAX_STRANGERS"  # Peer.max_strangers: message requests kept at most
Info = dict[str, Any]


def _passphrase(confirm: bool) -> str:
    """From $DNA_PASSPHRASE (scripts) or a prompt (people)."""
    if PASSPHRASE_ENV in os.environ:
        if confirm and not os.environ[PASSPHRASE_ENV]:
            _confirm_empty_passphrase()
        return _utf8(os.environ[PASSPHRASE_ENV], PASSPHRASE_ENV)
    if not sys.stdin.isatty():
        raise DnaError(f"no terminal to ask for a passphrase: set {PASSPHRASE_ENV}")
    first = _utf8(getpass.getpass("passphrase: "), "the passphrase")
    if confirm and getpass.getpass("again: ") != first:
        raise DnaError("the passphrases differ")
    if confirm and not first:
        _confirm_empty_passphrase()
    return first


def _own_passphrase(profile: Profile) -> str:
    """The passphrase of ``profile``'s key file, asked only once there is one: a home with no
    identity (a new user, a mistyped DNA_HOME) is said as such, not met with a prompt whose
    answer is thrown away (or, with no terminal, a call for DNA_PASSPHRASE)."""
    profile.read_keyfile()
    return _passphrase(confirm=False)


def _utf8(text: str, source: str) -> str:
    """``text`` unless it holds bytes that are not UTF-8 (an environment variable or a
    terminal in another encoding: Python keeps them as surrogates, which no key derivation
    can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DnaError(f"{source} is not valid UTF-8 text") from None
    return text


EMPTY_PASSPHRASE = (
    "an empty passphrase leaves your key file unprotected: anyone who copies it becomes you"
)


def _confirm_empty_passphrase() -> None:
    """A new key file without a passphrase: asked on a terminal, warned about in scripts."""
    if not sys.stdin.isatty():
        print(f"dna: warning: {EMPTY_PASSPHRASE}", file=sys.stderr)
        return
    answer = input(f"{EMPTY_PASSPHRASE}. Use no passphrase? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise DnaError("nothing was created: run it again and choose a passphrase")


def _emit(args: argparse.Namespace, info: Info) -> None:
    """One result: a JSON object for scripts, labelled lines for people."""
    if args.json:
        print(json.dumps(info), flush=True)
        return
    shown = {k.replace("_", " "): _human(k, v) for k, v in info.items()}
    width = max(map(len, shown), default=0)
    for label, text in shown.items():
        if text is not None:  # values may come from others (device names): escaped
            print(f"{label:>{width}}: {printable(text)}")


# Records (identity, name) are kept by every overlay node, bootstrap nodes too; messages
# only by the storage nodes of the mailbox.
_UNITS = {"published_on": "nodes", "replicas": "storage nodes (of 5)"}


def _human(key: str, value: object) -> str | None:
    """A value as a person reads it: yes/no, a name with its fingerprint, a count with
    its unit; None (nothing to say) is left out."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict) and "fingerprint" in value:
        name = value.get("name")
        return f"{name} ({value['fingerprint']})" if name else str(value["fingerprint"])
    unit = _UNITS.get(key)
    return f"{value} {unit}" if unit else str(value)


def _with_peer(
    args: argparse.Namespace,
    work: Callable[[Peer], Awaitable[None]],
    *,
    alone: bool = False,
    contact: str | None = None,
    unreachable: Callable[[DnaError, Cache], None] | None = None,
) -> None:
    """Unlock, join the network, run ``work``, leave; the profile held meanwhile (shared
    with other dna processes, or ``alone``: Profile.in_use). A ``contact`` the command
    names is looked up in the cache first: one that is not there is refused at once, not
    after joining the network (or failing to). With ``unreachable``, a network that does
    not answer is not an error: it gets the cache instead (a read that can do without)."""

    def known(cache: Cache) -> None:
        if contact is not None:
            find_contact(cache, contact)

    async def run() -> None:
        passphrase = _own_passphrase(args.profile)
        try:
            with phase_line("unlocking, joining the network…", enabled=not args.json):
                peer = await open_peer(args.profile, passphrase, args.seeds, check=known,
                                       sessions=args.command == "watch",
                                       max_strangers=args.max_strangers)  # fmt: skip
        except NetworkUnreachableError as exc:
            if unreachable is None:
                raise
            cache = args.profile.open_cache(args.profile.unlock(passphrase))
            try:
                unreachable(exc, cache)
            finally:
                cache.close()
            return
        try:
            await work(peer)
        finally:
            await peer.close()

    with args.profile.in_use(alone=alone):
        asyncio.run(run())


def _with_cache(args: argparse.Namespace, work: Callable[[Cache], object]) -> None:
    """Unlock and open the cache alone, no network: what needs only this device's data
    works with the network down (search, inbox --offline, contacts forget)."""
    with args.profile.in_use():
        cache = args.profile.open_cache(args.profile.unlock(_own_passphrase(args.profile)))
        try:
            work(cache)
        finally:
            cache.close()


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
    except DnaError as exc:  # the network went away, or refused the publish
        # The identity is written: a create run again would be refused as overwriting it.
        publish = "dna identity publish" + (f" --name {args.name}" if args.name else "")
        exc.args = (f"{exc}; your identity {identity.fingerprint.hex()[:16]}… was created in"
                    f" {args.profile.home} but not published: run `{publish}` when what"
                    " stopped it is put right",)  # fmt: skip
        raise


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
    keys = args.profile.public_keys()
    _emit(args, {"fingerprint": keys.fingerprint.hex(), "home": str(args.profile.home),
                 "device": args.profile.device().name})  # fmt: skip


def _export(args: argparse.Namespace) -> None:
    """Key material as armored text (see dna_peer.armor): the public key set to stdout or
    --out (no passphrase needed); with --private, the still-locked key file, checked with
    the passphrase, to a new owner-only --out file."""
    if args.private and args.out is None:
        raise DnaError("--private needs --out FILE (a backup file only you can read)")
    keyfile = args.profile.read_keyfile()
    public = keystore.read_public(keyfile)
    if args.private:
        args.profile.unlock(_passphrase(confirm=False))  # a backup that opens
        data = armor(LOCKED_KEY_FILE, keyfile, public.fingerprint)
        _write_new(args.out, data, private=True)
    else:
        data = armor(PUBLIC, public.encode(), public.fingerprint)
        if args.out is None and not args.json:
            print(data, end="")
            return
        if args.out is not None:
            _write_new(args.out, data, private=False)
    info: Info = {"fingerprint": public.fingerprint.hex(), "private": args.private}
    _emit(args, {**info, "exported_to": str(args.out)} if args.out else {**info, "armored": data})


def _write_new(path: Path, text: str, *, private: bool) -> None:
    """Create ``path``, whole or not at all (a full disk leaves no torn file that would
    block the next try); an existing file (the key file itself, say) is never overwritten."""
    try:
        write_atomic(path, text.encode(), mode=0o600 if private else 0o666, overwrite=False)
    except FileExistsError:
        raise DnaError(f"{path} exists; refusing to overwrite it") from None


def _import(args: argparse.Namespace) -> None:
    data = read_bounded(args.file, BACKUP_MAX_BYTES, "a backup from `dna identity export"
                        " --private`")  # fmt: skip
    if is_armored(data):  # raw key files (older backups) are read as they are
        kind, data = dearmor(data)
        if kind != LOCKED_KEY_FILE:
            raise DnaError(f"{args.file} holds a {kind.lower()}, not a backup: make one with"
                           " `dna identity export --private --out FILE`")  # fmt: skip
    try:
        keystore.read_public(data)  # before the passphrase: is this a key file at all?
    except MalformedError as exc:
        raise DnaError(f"{args.file} is not a backup from `dna identity export --private`"
                       f" ({exc})") from None  # fmt: skip
    identity = args.profile.restore(data, _passphrase(confirm=False))
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

    async def work(peer: Peer) -> None:  # alone: it re-keys the cache others would hold
        old = peer.fingerprint
        new = await peer.rotate(args.reason)
        _emit(args, {"old_fingerprint": old.hex(), "fingerprint": new.fingerprint.hex(),
                     "contacts_told": len([c for c in peer.cache.contacts()
                                           if c.replaced_by is None])})  # fmt: skip

    _with_peer(args, work, alone=True)


def _accept(args: argparse.Namespace) -> None:
    normalize_code(args.code)  # a code that cannot be one: said before the network

    async def run() -> None:
        # the passphrase is asked once the code found its offer (a wrong code fails first)
        peer = await accept_link(args.profile, args.code, lambda: _passphrase(confirm=True),
                                 args.seeds, max_strangers=args.max_strangers)  # fmt: skip
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
    return _contact_info_for(peer.fingerprint, c)


def _contact_info_for(own: bytes, c: Contact) -> Info:
    return {"name": c.name, "fingerprint": c.fingerprint.hex(), "verified": c.verified,
            "safety_number": safety_number(own, c.fingerprint)}  # fmt: skip


def _contacts_add(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        _emit(args, _contact_info(peer, await peer.add_contact(args.who)))

    _with_peer(args, work)


def _contacts_list(args: argparse.Namespace) -> None:
    """The pinned contacts, from this device's cache alone (no network); with --online
    each one's presence is looked up too (``"online": null`` without it: not known)."""
    if not args.online:

        def offline(cache: Cache) -> None:
            own = args.profile.public_keys().fingerprint  # the key file, unlocked already
            _show_contacts(args, [{**_contact_info_for(own, c), "online": None}
                                  for c in cache.contacts()])  # fmt: skip

        _with_cache(args, offline)
        return

    async def work(peer: Peer) -> None:
        pinned = peer.cache.contacts()
        found = await peer.presence_of_all(pinned)  # a fresh record each, a few at a time
        _show_contacts(args, [{**_contact_info(peer, c), "online": p is not None}
                              for c, p in zip(pinned, found, strict=True)])  # fmt: skip

    _with_peer(args, work)


def _show_contacts(args: argparse.Namespace, contacts: list[Info]) -> None:
    if args.json:
        print(json.dumps(contacts))
        return
    out = console()
    columns = ("name", "fingerprint", "verified") + (("online",) if args.online else ())
    grid = table(out, *columns)
    for c in contacts:
        mark = Text("yes", style="green") if c["verified"] else Text("no", style="yellow")
        row: list[Text | str] = [Text(printable(c["name"] or "(no name)")), c["fingerprint"], mark]
        if args.online:
            on = c["online"]
            row.append(Text("online" if on else "offline", style="green" if on else "dim"))
        grid.add_row(*row)
    out.print(grid if contacts else "no contacts yet: `dna contacts add NAME`")


def _contacts_verify(args: argparse.Namespace) -> None:
    """The safety number of the key pinned on this device: from the cache alone (what is
    compared is what this device would encrypt to), so it works with the network down;
    ``--online`` first follows the rotations the contact published (signed by the pinned
    key), so the number is the one of their current keys."""
    if not args.online:

        def offline(cache: Cache) -> None:
            own = args.profile.public_keys().fingerprint  # the key file, unlocked already
            _verify(args, cache, own, find_contact(cache, args.who))

        _with_cache(args, offline)
        return

    async def work(peer: Peer) -> None:
        contact = await peer.refresh_contact(peer.find_contact(args.who))
        _verify(args, peer.cache, peer.fingerprint, contact)
        await peer.post_cards_due()  # online already: the other devices hear it now

    _with_peer(args, work, contact=args.who)


def _verify(args: argparse.Namespace, cache: Cache, own: bytes, contact: Contact) -> None:
    if args.confirm:
        cache.confirm_verified(contact.fingerprint)  # the other devices: at the next sync
        contact = cache.contact(contact.fingerprint) or contact
    elif not args.json:
        print("Compare this number with your contact (in person or on a call);")
        print(f"if it matches, run: dna contacts verify {args.who} --confirm")
    _emit(args, _contact_info_for(own, contact))


def _contacts_forget(args: argparse.Namespace) -> None:
    def work(cache: Cache) -> None:  # this device's pin alone: no network needed
        contact = find_contact(cache, args.who)
        cache.forget_contact(contact.fingerprint)
        _emit(args, {"forgotten": _party(cache, contact.fingerprint)})

    _with_cache(args, work)


# -- messages -----------------------------------------------------------------------


# A failed send leaves the sealed message in the outbox (Peer.send): said, so that the user
# neither thinks it lost nor writes it again (the same text again takes the same message).
KEPT_TO_SEND = (
    "the message is kept on this device: the next `dna sync`, `dna inbox` or `dna watch`"
    " sends it (or this `dna send` again, once the network answers)"
)


def _send(args: argparse.Namespace) -> None:
    body = _message_text(args)
    check_text(body)  # before the passphrase, the network and the contact

    async def work(peer: Peer) -> None:
        contact = peer.find_contact(args.to)
        if direct_enabled():
            await peer.go_direct(ice_config(), listen=False)
        with phase_line("sealing; direct if they are online, else storing on the replicas…",
                        enabled=not args.json):  # fmt: skip
            try:
                sent = await peer.send(contact, body)
            except DnaError as exc:
                if any(q.body == body for q in peer.cache.outgoing(contact.fingerprint)):
                    exc.args = (f"{exc}; {KEPT_TO_SEND}",)
                raise
        info: Info = {"to": _party(peer.cache, contact.fingerprint),
                      "message_id": sent.message_id.hex(), "path": sent.path,
                      "replicas": sent.stored_on}  # fmt: skip
        if sent.path == DIRECT and peer.direct is not None:  # which pair: through NATs or a relay
            info["route"] = peer.direct.route_to(contact.fingerprint)
            info["route_ip"] = peer.direct.route_ip_to(contact.fingerprint)
        _emit(args, info)

    _with_peer(args, work, contact=args.to)


def _message_text(args: argparse.Namespace) -> str:
    """The text to send: the arguments, `-` or a piped stdin, or --file. A trailing line
    break (from `echo` or an editor, `\n` or `\r\n`) is not part of the message, nor of
    its size."""
    if args.file is not None and args.text:
        raise DnaError("give the message as arguments or --file, not both")
    if args.file is not None:
        try:
            with args.file.open("rb") as f:
                return _read_text(f, str(args.file))
        except OSError as exc:  # missing, a directory, unreadable: say which file
            raise DnaError(f"cannot read --file {args.file}: {exc.strerror or exc}") from None
    if args.text == ["-"] or (not args.text and not sys.stdin.isatty()):
        return _read_text(sys.stdin.buffer, "stdin")
    if not args.text:
        raise DnaError("no message: give it as arguments, `-` for stdin, or --file FILE")
    return " ".join(args.text)


_LINE_BREAK = 2  # "\r\n": read past the limit by one trailing line break


def _read_text(stream: BinaryIO, source: str) -> str:
    """At most the largest message and a trailing line break: a 10 MB pipe is refused
    after reading just past the limit, not held in memory."""
    data = stream.read(MAX_TEXT_BYTES + _LINE_BREAK + 1)
    if len(data) > MAX_TEXT_BYTES + _LINE_BREAK:
        raise InvalidMessageError(
            f"the message in {source} is over {MAX_TEXT_BYTES:,} bytes, the most that fit in"
            " one message (the 192 KiB envelope cap less 1 KiB of framing)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessageError(f"the message in {source} is not valid UTF-8 text") from None
    return text.rstrip("\r\n")  # check_text then counts what is sent


def _message_info(peer: Peer, m: Message) -> Info:
    return _message_info_from(peer.cache, m)


def _message_info_from(cache: Cache, m: Message, sender: Info | None = None,
                       recipient: Info | None = None) -> Info:  # fmt: skip
    """A message for scripts: full fingerprints with the names we know them by (the
    parties given when the caller knows them already)."""
    return {"message_id": m.message_id.hex(), "from": sender or _party(cache, m.sender),
            "to": recipient or _party(cache, m.recipient), "outgoing": m.outgoing,
            "time_ms": m.timestamp_ms, "text": m.body, "delivered": m.delivered}  # fmt: skip


def _party(cache: Cache, fingerprint: bytes) -> Info:
    """Someone in a message: the fingerprint, and their name if they are a named contact
    (None for ourselves and for senders not named yet); keys a contact rotated away from
    carry the name of the contact they became."""
    contact = cache.current_contact(fingerprint)
    return {"fingerprint": fingerprint.hex(), "name": contact.name if contact else None}


def _who(party: Info, *, me: bool) -> str:
    """How a person reads a party: "you", the contact's name, or a fingerprint prefix."""
    return "you" if me else printable(party["name"] or party["fingerprint"][:16])


def _print_message(info: Info) -> None:
    """One message; what its sender controls (the text) is shown escaped, and its
    continuation lines indented, so that it cannot pass for lines of our own."""
    when = datetime.datetime.fromtimestamp(info["time_ms"] / 1000).strftime("%Y-%m-%d %H:%M:%S")
    tick = " ✓" if info["delivered"] else ""
    text = printable(info["text"], newlines=True).replace("\n", "\n    ")
    sender = _who(info["from"], me=info["outgoing"])
    recipient = _who(info["to"], me=not info["outgoing"])
    print(f"[{when}] {sender} → {recipient}: {text}{tick}", flush=True)


def _inbox(args: argparse.Namespace) -> None:
    """Sync, then show; a network that is down (no bootstrap node, no storage node) does
    not stand between a person and the history on this device: the cache is shown as it
    is, with a warning, and nothing is marked read (the other devices could not be told)."""
    if args.offline:  # the cache alone: works with the network down; marks nothing read
        _with_cache(args, lambda cache: _show_inbox(args, cache))
        return

    async def work(peer: Peer) -> None:
        phase = "looking up your mailbox replicas, fetching…"
        try:
            with progress_bar(phase, "blobs", enabled=not args.json) as update:
                report = await peer.sync(progress=update)
        except UnreachableError as exc:
            _not_synced(args, exc, peer.cache)
            return
        _tell_unpinned_rotations(args, report)
        contact = _show_inbox(args, peer.cache)
        if contact is not None:
            await peer.mark_read(contact)  # what was shown is read, on every device

    # No contact check before the sync: the sync may bring the contact (a card from
    # another device, the history a new device waits for).
    _with_peer(args, work, unreachable=lambda exc, cache: _not_synced(args, exc, cache))


def _tell_unpinned_rotations(args: argparse.Namespace, report: SyncReport) -> None:
    """One calm line for the key rotations of people this device has no pin for (on a
    restored device, every contact's still in the mailbox): nothing was refused, and the
    devices that have the pins still get them (`Inbox._plan_contact_rotation`)."""
    if report.unpinned_rotations and not args.json:
        print(f"dna: {report.unpinned_rotations} key rotation notice(s) from people who are"
              " not contacts on this device: nothing to update (your other devices send"
              " their contacts; `dna contacts add` finds anyone's current keys)",
              file=sys.stderr, flush=True)  # fmt: skip


def _not_synced(args: argparse.Namespace, why: DnaError, cache: Cache) -> None:
    if args.contact:  # not there, and no sync to bring it: that is the one line to say
        find_contact(cache, args.contact)
    print(f"dna: warning: not synced ({printable(str(why))}): this device's messages as they"
          " were; nothing marked read", file=sys.stderr, flush=True)  # fmt: skip
    _show_inbox(args, cache)


def _show_inbox(args: argparse.Namespace, cache: Cache) -> Contact | None:
    """The conversation list, or one conversation (returned: the caller marks it read)."""
    if not args.contact:
        _show_conversations(args, cache)
        return None
    contact = find_contact(cache, args.contact)
    messages = cache.iter_messages(contact.conversation, last=args.last or -1)
    parties: dict[bytes, Info] = {}  # two people in a conversation: not a lookup a message

    def info(m: Message) -> Info:
        for who in (m.sender, m.recipient):
            if who not in parties:
                parties[who] = _party(cache, who)
        return _message_info_from(cache, m, parties[m.sender], parties[m.recipient])

    if args.json:  # one JSON array, written as it is read: bounded memory at any length
        print("[", end="")
        for n, m in enumerate(messages):
            print((", " if n else "") + json.dumps(info(m)), end="")
        print("]")
    else:
        for m in messages:
            _print_message(info(m))
    return contact


def _show_conversations(args: argparse.Namespace, cache: Cache) -> None:
    rows: list[Info] = []
    for conv in cache.conversations():
        last = cache.last_message(conv.id)  # the newest, not the whole conversation
        rows.append({"contact": _party(cache, conv.peer), "unread": conv.unread,
                     "last": last.body if last else None,
                     "last_time_ms": last.timestamp_ms if last else None})  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return
    if not rows:
        print("no conversations yet")
        if cache.get_state(RECOVERING) is not None:
            print("(this device is new or restored: your other devices send it the history"
                  " when they next sync; run `dna sync` there)")  # fmt: skip
        return
    out = console()
    grid = table(out, "contact", "unread", "last message")
    for row in rows:
        unread = Text(str(row["unread"]), style="bold" if row["unread"] else "")
        grid.add_row(Text(_who(row["contact"], me=False)), unread,
                     Text(printable(_preview(row["last"] or ""))))  # fmt: skip
    out.print(grid)


PREVIEW_CHARS = 80


def _preview(text: str) -> str:
    """The start of a message for the conversation list: its first line, at most
    PREVIEW_CHARS characters, so that a long message (up to 195 KB on one line) neither
    squeezes the other columns away in a pipe nor fills the terminal."""
    first = text.split("\n", 1)[0].removesuffix("\r")  # a lone CR stays, shown escaped
    return first if len(first) <= PREVIEW_CHARS else first[: PREVIEW_CHARS - 1] + "…"


SEARCH_SHOWN = 100  # the newest messages found that `dna search` shows


def _search(args: argparse.Namespace) -> None:
    words = " ".join(args.words)
    if not words.strip():  # before the passphrase: `dna search ""` finds nothing, ever
        raise DnaError("nothing to search for: give one or more words")

    def work(cache: Cache) -> None:  # the cache alone: no network needed
        found = [_message_info_from(cache, m) for m in cache.search(words, limit=SEARCH_SHOWN)]
        if args.json:
            print(json.dumps(found))
        elif not found:
            print(f"no message has {printable(words)!r}" if len(args.words) == 1 else
                  f"no message has all of: {printable(words)}")  # fmt: skip
        for info in [] if args.json else found:
            _print_message(info)
        if len(found) == SEARCH_SHOWN and (total := cache.search_count(words)) > len(found):
            print(f"dna: the newest {len(found)} of {total:,} messages that have"
                  f" {printable(words)!r}: add words to find older ones",
                  file=sys.stderr)  # fmt: skip

    _with_cache(args, work)


def _watch(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        stop = asyncio.current_task()
        assert stop is not None
        reader_gone = False

        def show(m: Message) -> None:
            """Each message as soon as it is opened (the inbox's hook, before its commit
            and before the rest of the round: a backlog of thousands, or a round with
            receipts and deletes still to go, shows its first message at once)."""
            nonlocal reader_gone
            info = _message_info(peer, m)
            try:
                if args.json:
                    print(json.dumps(info), flush=True)
                else:
                    _print_message(info)
            except BrokenPipeError:  # `dna watch | head -1`: the hook's caller would log
                reader_gone = True  # it and go on; stop instead, quietly (status 141)
                stop.cancel()

        def network(text: str) -> None:  # outages and returns, on stderr (stdout: messages)
            # the reason may quote a node's error text: escaped like everything from others
            print(f"dna: {printable(text)}", file=sys.stderr, flush=True)

        peer.on_message = show  # the mailbox and the direct path alike
        if direct_enabled():  # online: presence published, contacts may connect directly
            await peer.go_direct(ice_config(), listen=True)
        # A service manager stops it with SIGTERM: the same clean stop as Ctrl-C (presence
        # withdrawn, what is owed settled), not a kill that leaves "online" behind.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.cancel)
        if not args.json:
            print("watching for messages (Ctrl-C to stop)", flush=True)
        freeze_startup_heap()  # up for good: full collections skip what it set up
        with contextlib.suppress(asyncio.CancelledError):
            await peer.watch(lambda report: None, interval=args.interval, on_network=network)
        if reader_gone:
            raise BrokenPipeError

    with contextlib.suppress(KeyboardInterrupt):
        _with_peer(args, work)


def _sync(args: argparse.Namespace) -> None:
    async def work(peer: Peer) -> None:
        phase = "looking up your mailbox replicas, fetching…"
        with progress_bar(phase, "blobs", enabled=not args.json) as update:
            report = await peer.sync(progress=update)
        _tell_unpinned_rotations(args, report)
        _emit(args, {"new_messages": len(report.new_messages), "receipts": report.receipts,
                     "rejected": len(report.rejected), "deleted_from_network": report.deleted,
                     "messages_in_cache": peer.cache.message_count()})  # fmt: skip
        if report.cleanup_error:  # the mailbox is filling up: a script must notice
            raise DnaError(report.cleanup_error)

    _with_peer(args, work)


def _demo(args: argparse.Namespace) -> None:
    from dna_peer.demo import run_demo

    run_demo(as_json=args.json)


class _EscapingFormatter(logging.Formatter):
    """Log lines can carry text from others (a reason, a device name): escaped too."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), newlines=True)


def _log_to_stderr(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_EscapingFormatter("dna: %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


# -- parser -------------------------------------------------------------------------


EXAMPLES = """\
examples:
  dna identity create --name alice     a new identity, published, with the name "alice"
  dna contacts add bob                 find bob and pin his key (trust on first use)
  dna contacts verify bob              the safety number to compare with bob
  dna send bob "hello"                 or: echo hello | dna send bob -   dna send bob --file F
  dna inbox                            sync, then one line per conversation
  dna inbox bob --json | jq .          one conversation, for scripts
  dna watch                            print messages as they arrive (Ctrl-C to stop)
  dna identity link                    a one-time code to link your next device

environment:
  DNA_HOME        the profile directory (default ~/.dna); --home overrides it
  DNA_PASSPHRASE  the passphrase, for scripts (otherwise dna asks for it)
  DNA_BOOTSTRAP   host:port[,host:port] of bootstrap nodes (default: the local
                  testnet of `dna-testnet up`); --bootstrap overrides it
  DNA_STUN, DNA_TURN  host:port of the STUN and TURN servers for direct messages
                  (DNA_TURN_USER, DNA_TURN_PASSWORD: the TURN credentials)
  DNA_DIRECT=0    never the direct path: every message through the storage nodes
  DNA_MAX_STRANGERS  message requests (strangers who wrote first) kept at most
                  (default 2000); pinning one more forgets the tenth idle longest
  NO_COLOR        no colours (neither are used when the output is not a terminal)

The global options (--json, -v, --home, --bootstrap) go before or after the
command. Errors are one line on stderr (a JSON object under --json), exit code 1;
usage errors exit 2 (under --json, so does a missing command). docs/peer.md has
the whole guide.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" on a mistyped command, and usage errors in one line
    (a JSON object under --json)."""

    as_json = False  # --json anywhere on the command line (set before parsing)

    def error(self, message: str) -> NoReturn:
        if "invalid choice" in message:
            wrong = message.split("'")[1] if "'" in message else ""
            choices = [c for c in self._choices() if isinstance(c, str)]
            close = difflib.get_close_matches(wrong, choices, n=1)
            if close:
                message = f"{message}; did you mean '{close[0]}'?"
        _usage_error(self, message)

    def _choices(self) -> list[object]:
        return list(self.commands())

    def commands(self) -> dict[str, _Parser]:
        """The commands (or actions) this parser takes, by name."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def parse_command_line(self, argv: list[str]) -> argparse.Namespace:
        """``parse_args``, but an argument no command takes is reported by the command it
        was given to, with that command's help to read (`dna inbox --frobnicate`)."""
        args, extra = self.parse_known_args(argv)
        if extra:
            parser = self
            for name in (getattr(args, "command", None), getattr(args, "action", None)):
                parser = parser.commands().get(name or "", parser)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """A command line that cannot run: one line on stderr naming the help to read (under
    --json, an object of ``kind`` UsageError with the usage), exit code 2."""
    if _Parser.as_json:
        print(json.dumps({"error": message, "kind": "UsageError",
                          "usage": parser.format_usage().strip()}), file=sys.stderr)  # fmt: skip
    else:  # the message may quote what was typed (a name with an ESC in it): escaped
        print(f"dna: error: {printable(message)} (see `{parser.prog} --help`)", file=sys.stderr)
    sys.exit(2)


class _Version(argparse.Action):
    """--version: a line, or {"version": ...} under --json."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(json.dumps({"version": __version__}) if _Parser.as_json else f"dna {__version__}")
        parser.exit()


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after it: the subcommands' copies
    default to SUPPRESS so they never undo a value given before the command."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output: one JSON document (watch: one per"
                        " message); errors as JSON on stderr")  # fmt: skip
    parser.add_argument("--home", default=default(None), metavar="DIR",
                        help="profile directory (default $DNA_HOME, else ~/.dna)")  # fmt: skip
    parser.add_argument("--bootstrap", default=default(None), metavar="HOST:PORT[,...]",
                        help="bootstrap nodes to join through (default $DNA_BOOTSTRAP, else"
                        " the local testnet)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log what happens (on stderr)")  # fmt: skip


_GLOBALS = _Parser(add_help=False)
_global_options(_GLOBALS, top=False)


def _add(
    sub: Any,
    name: str,
    handler: Callable[[argparse.Namespace], None],
    text: str,
    *,
    network: bool = True,
) -> Any:
    """A command; ``network=False``: it needs only this device (never reads the network
    settings, so it works with none, or broken ones, and the network down)."""
    cmd = sub.add_parser(name, help=text, description=text, parents=[_GLOBALS])
    cmd.set_defaults(handler=handler, network=network)
    return cmd


def _group(sub: Any, name: str, text: str) -> Any:
    """A command with actions (identity, contacts); alone, it prints its help (under
    --json, a usage error: a script gets JSON or nothing)."""
    group = sub.add_parser(name, help=text, description=text, parents=[_GLOBALS])
    group.set_defaults(handler=lambda args: _missing(group, "an action"))
    return group.add_subparsers(dest="action", metavar="ACTION", title="actions")


def _missing(parser: _Parser, what: str) -> None:
    """``dna`` or ``dna contacts`` alone: the help for a person, a usage error under --json."""
    if not _Parser.as_json:
        parser.print_help()
        return
    choices = ", ".join(c for c in parser._choices() if isinstance(c, str))
    _usage_error(parser, f"`{parser.prog}` needs {what}: one of {choices}")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of messages (1 or more)")
    return value


DEVICE_NAME_MAX = 64


def _device_name(text: str) -> str:
    """A device name others see in device lists: 1-64 printable characters."""
    name = text.strip()
    if not 1 <= len(name) <= DEVICE_NAME_MAX or not name.isprintable():
        raise argparse.ArgumentTypeError(
            f"a device name has 1-{DEVICE_NAME_MAX} printable characters, not {text!r}"
        )
    return name


REASON_MAX = 200  # the statement carries the new keys too: a record holds 8 KiB in all


def _reason(text: str) -> str:
    """A rotation's reason, which contacts may read: printable, and short enough that the
    statement fits a record (checked before the network and before any key is made)."""
    if len(text) > REASON_MAX or not text.isprintable():
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise argparse.ArgumentTypeError(
            f"a reason has at most {REASON_MAX} printable characters, not {shown!r} ({len(text)})"
        )
    return text


def build_parser() -> _Parser:
    parser = _Parser(prog="dna", description="DNA Messenger v2: post-quantum, decentralized"
                     " messaging.", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    ident = _group(sub, "identity", "your identity and devices")
    create = _add(ident, "create", _create, "create an identity and publish it")
    publish = _add(ident, "publish", _publish, "(re)publish your identity record and name")
    for cmd in (create, publish):
        cmd.add_argument("--name", help="a unique name others can find you by (proof of work)")
        cmd.add_argument("--display-name", help="shown to contacts (default: the name)")
    create.add_argument("--offline", action="store_true", help="do not publish yet")
    _add(ident, "show", _show, "show the fingerprint (no passphrase needed)", network=False)
    export = _add(ident, "export", _export, "print your public key set as text (or, with"
                  " --private, write a backup of your locked key file)", network=False)  # fmt: skip
    export.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write to FILE instead of stdout (required with --private)",
    )
    export.add_argument(
        "--private",
        action="store_true",
        help="the key file, still locked with your passphrase: a backup",
    )
    _add(ident, "import", _import, "start this device from an `identity export --private` backup",
         network=False).add_argument("file", type=Path, help="the backup file")  # fmt: skip
    link = _add(ident, "link", _link, "link a new device: without CODE print one, with it use it")
    link.add_argument("code", nargs="?", help="the code shown on your existing device")
    link.add_argument("--device-name", type=_device_name, default="new device",
                      help="name of the new device (1-64 printable characters)")  # fmt: skip
    rotate = _add(ident, "rotate", _rotate, "move to a new key set (contacts and your other"
                  " devices follow; the old mailbox is read for 30 more days)")  # fmt: skip
    rotate.add_argument("--reason", type=_reason, default="", help="said in the rotation"
                        f" statement (at most {REASON_MAX} printable characters)")  # fmt: skip

    contacts = _group(sub, "contacts", "your contacts")
    _add(contacts, "add", _contacts_add, "find someone by name or fingerprint and pin their key"
         ).add_argument("who", help="a name or a 64-hex fingerprint")  # fmt: skip
    listing = _add(contacts, "list", _contacts_list, "list contacts (this device alone, no"
                   " network needed)", network=False)  # fmt: skip
    listing.add_argument("--online", action="store_true", help="also look up who is online"
                         " now (joins the network)")  # fmt: skip
    verify = _add(contacts, "verify", _contacts_verify, "show the safety number to compare"
                  " (this device's pin, no network needed)", network=False)  # fmt: skip
    verify.add_argument("who", help="a contact's name or fingerprint")
    verify.add_argument("--confirm", action="store_true", help="it matched: mark verified")
    verify.add_argument("--online", action="store_true", help="first follow the key rotations"
                        " the contact published (joins the network)")  # fmt: skip
    forget = _add(contacts, "forget", _contacts_forget, "unpin a contact's key (history stays;"
                  " no network needed)", network=False)  # fmt: skip
    forget.add_argument("who", help="a contact's name or fingerprint")

    send = _add(sub, "send", _send, "send a message (from the arguments, stdin or a file)")
    send.add_argument("to", help="a contact's name or fingerprint")
    send.add_argument("text", nargs="*", default=[], help="the message; `-` (or nothing,"
                      " with stdin not a terminal) reads it from stdin")  # fmt: skip
    send.add_argument("--file", type=Path, help="read the message from FILE (UTF-8 text)")
    inbox = _add(sub, "inbox", _inbox, "sync and show conversations, or one conversation")
    inbox.add_argument("contact", nargs="?", help="show this contact's conversation")
    inbox.add_argument("--last", type=_count, metavar="N", help="with a contact: only the"
                       " newest N messages of the conversation (default: all)")  # fmt: skip
    inbox.add_argument(
        "--offline",
        action="store_true",
        help="show the cache without syncing (no network needed; marks nothing read)",
    )
    watch = _add(sub, "watch", _watch, "print messages as they arrive")
    watch.add_argument("--interval", type=_positive, default=1.0,
                       help="seconds between syncs when nothing is pushed (default 1)")  # fmt: skip
    _add(sub, "sync", _sync, "fetch your mailbox now")
    _add(sub, "search", _search, "search your messages (offline)", network=False).add_argument(
        "words", nargs="+", help="words to find (full-text, any case)"
    )
    _add(sub, "demo", _demo, "run the in-process crypto demonstration", network=False)
    return parser


def _settle(args: argparse.Namespace) -> None:
    """Arguments and environment read and checked before any command runs; the network
    settings only for a command that joins the network."""
    args.profile = _profile(args.home)
    if _joins_network(args):
        args.seeds = parse_seeds(args.bootstrap) if args.bootstrap is not None else default_seeds()
        args.max_strangers = _max_strangers()


def _max_strangers() -> int:
    """$DNA_MAX_STRANGERS (`Peer.max_strangers`), else the default (`inbox.MAX_STRANGERS`):
    a whole number of at least 1, checked before anything runs."""
    text = os.environ.get(MAX_STRANGERS_ENV)
    if text is None:
        return MAX_STRANGERS
    digits = text.strip()
    # (at most 18 digits: Python refuses to convert more than 4,300 with a ValueError, and
    # no count of message requests kept needs more than this)
    value = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 18 else 0
    if value < 1:
        raise DnaError(f"{MAX_STRANGERS_ENV}={text!r}: the message requests kept at most, a"
                       f" whole number of at least 1, of at most 18 digits (default"
                       f" {MAX_STRANGERS})")  # fmt: skip
    return value


def _joins_network(args: argparse.Namespace) -> bool:
    if getattr(args, "offline", False):  # inbox --offline, identity create --offline
        return False
    return bool(getattr(args, "network", False) or getattr(args, "online", False))


def _profile(home: str | None) -> Profile:
    """--home, else $DNA_HOME, else ~/.dna; empty (`--home ""`: the working directory, by
    accident) or a file is refused before anything reads or writes there."""
    if home is not None and not home.strip():
        raise DnaError('--home is empty: name a directory (or leave it out: $DNA_HOME, else'
                       " ~/.dna)")  # fmt: skip
    profile = Profile(Path(home)) if home is not None else Profile.default()
    if profile.home.exists() and not profile.home.is_dir():
        raise DnaError(f"{profile.home} is not a directory: the profile (--home or DNA_HOME)"
                       " is a directory of its own")  # fmt: skip
    return profile


def _os_error(exc: OSError) -> str:
    """``PATH: No such file or directory``, as Unix tools say it, rather than Python's
    ``[Errno 2] No such file or directory: 'PATH'``."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}"


def _fail(args: argparse.Namespace | None, message: str, kind: str = "DnaError") -> NoReturn:
    """The one way out on failure: a line on stderr (under --json, an object whose ``kind``
    is the error's class, e.g. UnknownContactError), exit code 1."""
    if args is not None and args.json:
        print(json.dumps({"error": message, "kind": kind}), file=sys.stderr)
    else:
        print(f"dna: error: {printable(message)}", file=sys.stderr)
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _Parser.as_json = _asks_json(argv)
    with quiet_broken_pipe():
        args = parser.parse_command_line(argv)
        _log_to_stderr(args.verbose)
        if "handler" not in args:  # no command
            _missing(parser, "a command")
            return
        _run(args)


def _asks_json(argv: list[str]) -> bool:
    """--json as argparse will read it, known before parsing (a usage error must already
    speak JSON): an option only before a bare `--` (after it, arguments are data: `dna send
    bob -- --json` sends the text "--json"), and written in full or abbreviated (`--js`)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return any(len(arg) >= 3 and "--json".startswith(arg) for arg in options)


def _run(args: argparse.Namespace) -> None:
    """The one error handler: every failure is one line (JSON under --json), exit code 1."""
    try:
        _settle(args)
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except EOFError:  # Ctrl-D at a prompt
        _fail(args, "no answer (end of input): nothing was changed")
    except BrokenPipeError:
        raise  # quiet_broken_pipe's
    except OSError as exc:
        _fail(args, _os_error(exc), type(exc).__name__)
    except DnaError as exc:
        _fail(args, str(exc), type(exc).__name__)
    except Exception as exc:  # a defect: still one line, the traceback with -v
        if args.verbose:
            traceback.print_exc()
        _fail(args, f"internal error: {type(exc).__name__}: {exc}"
              + ("" if args.verbose else " (run with -v for the traceback)"),
              "InternalError")  # fmt: skip
