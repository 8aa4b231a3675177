"""`revault-keygen noise|bitcoin FILE`: create a key file, print its public key in hex."""

from __future__ import annotations

import argparse
import sys

from revault.keys import (
    KeyFileError, bitcoin_public_key, create_key_file, generate_bitcoin_key,
    generate_noise_key, noise_public_key,
)

KINDS = {
    "noise": (generate_noise_key, noise_public_key),
    "bitcoin": (generate_bitcoin_key, bitcoin_public_key),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revault-keygen",
        description="Create a 32-byte secret key file (mode 0600, never overwritten) "
                    "and print its public key in hex.")
    parser.add_argument("kind", choices=sorted(KINDS),
                        help="noise: X25519 transport key; bitcoin: secp256k1 key")
    parser.add_argument("file", help="path of the key file to create")
    args = parser.parse_args(argv)
    generate, public = KINDS[args.kind]
    secret = generate()
    try:
        create_key_file(args.file, secret)
    except KeyFileError as e:
        print(f"revault-keygen: {e}", file=sys.stderr)
        return 1
    print(public(secret).hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
