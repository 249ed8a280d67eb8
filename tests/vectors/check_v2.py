#!/usr/bin/env python3
"""Checks README's protocol v2 test vectors with Python's `cryptography`, from the
spec text alone (shares no code with onboardd). Reads the vectors as JSON on stdin,
prints what it computed as JSON on stdout, exits 1 when any value differs."""
import json
import sys

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def mac(key: bytes, msg: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(msg)
    return h.finalize()


def compute(v: dict) -> dict:
    sensor_key = mac(v["claim_key"].encode(), v["sensor_id"].encode())
    mac_key = mac(sensor_key, b"onboardd-mac-v2")
    seal_key = mac(sensor_key, b"onboardd-seal-v2")
    body = v["announce_body"]
    nonce = json.loads(body)["nonce"]
    aad = f'{v["sensor_id"]}/{v["device_id"]}/{nonce}'.encode()
    gcm_nonce = bytes.fromhex(v["gcm_nonce"])
    sealed = gcm_nonce + AESGCM(seal_key).encrypt(gcm_nonce, v["token"].encode(), aad)
    reply_body = v["reply_body"]
    assert json.loads(reply_body)["device_token_sealed"] == sealed.hex(), "the reply carries the sealed token"
    assert json.loads(reply_body)["nonce"] == nonce, "the reply carries the announce's nonce"
    opened = AESGCM(seal_key).decrypt(sealed[:12], sealed[12:], aad).decode()
    assert opened == v["token"], "the sealed token opens to the token"
    return {
        "sensor_key": sensor_key.hex(),
        "mac_key": mac_key.hex(),
        "seal_key": seal_key.hex(),
        "proof": mac(sensor_key, b"onboardd-announce-v2\n" + body.encode()).hex(),
        "device_token_sealed": sealed.hex(),
        "reply_mac": mac(mac_key, b"onboardd-reply-v2\n" + reply_body.encode()).hex(),
    }


def main() -> int:
    vectors = json.load(sys.stdin)
    got = compute(vectors)
    json.dump(got, sys.stdout, indent=1)
    wrong = [k for k, value in got.items() if vectors.get(k) != value]
    if wrong:
        print(f"\ncheck_v2.py: differ from the vectors: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
