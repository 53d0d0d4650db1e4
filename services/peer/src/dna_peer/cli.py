"""`dna`: the command line for a person. Identities today; messaging with its issue."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dna_core import __version__
from dna_core.crypto import Identity, PublicKeySet, keystore
from dna_core.errors import DnaError

PASSPHRASE_ENV = "DNA_PASSPHRASE"


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


def _describe(keys: PublicKeySet) -> dict[str, str | int]:
    return {"fingerprint": keys.fingerprint.hex(), "public_key_set_bytes": len(keys.encode())}


def _emit(args: argparse.Namespace, info: dict[str, str | int]) -> None:
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v}")


def _create(args: argparse.Namespace) -> None:
    if args.keyfile.exists():
        raise DnaError(f"{args.keyfile} exists; refusing to overwrite an identity")
    identity = Identity.generate()
    data = keystore.lock(identity, _passphrase(confirm=True))
    args.keyfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _emit(args, {**_describe(identity.public), "keyfile": str(args.keyfile)})


def _show(args: argparse.Namespace) -> None:
    _emit(args, _describe(keystore.read_public(args.keyfile.read_bytes())))


def _export(args: argparse.Namespace) -> None:
    identity = keystore.unlock(args.keyfile.read_bytes(), _passphrase(confirm=False))
    args.out.write_bytes(identity.public.encode())
    _emit(args, {**_describe(identity.public), "exported_to": str(args.out)})


def _demo(args: argparse.Namespace) -> None:
    from dna_peer.demo import run_demo

    run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dna", description="DNA Messenger v2 client.")
    parser.add_argument("--version", action="version", version=f"dna {__version__}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    ident = sub.add_parser("identity", help="create, show or export your identity")
    isub = ident.add_subparsers(dest="action", required=True)
    default_key = Path(os.environ.get("DNA_HOME", Path.home() / ".dna")) / "identity.key"
    for name, handler, text in (
        ("create", _create, "create a new identity, locked with a passphrase"),
        ("show", _show, "show the fingerprint (no passphrase needed)"),
        ("export", _export, "write your public key set for others to import"),
    ):
        cmd = isub.add_parser(name, help=text)
        cmd.add_argument("--keyfile", type=Path, default=default_key)
        cmd.set_defaults(handler=handler)
        if name == "export":
            cmd.add_argument("--out", type=Path, required=True)
    sub.add_parser("demo", help="run the demonstration").set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (DnaError, OSError) as exc:
        print(f"dna: error: {exc}", file=sys.stderr)
        sys.exit(1)
