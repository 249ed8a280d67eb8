#!/usr/bin/python3
"""The sensor's side of protocol v2 for the service test, written from README's spec
alone (it shares no code with onboardd): builds an announce as firmware does and
reads a reply as firmware reads it.

Usage:
  protocol.py announce SENSOR_KEY_HEX FIELDS_JSON
      prints "NONCE PAYLOAD" (one line): a fresh nonce and the announce
      {"body": B, "proof": P} whose body is FIELDS_JSON plus that nonce.
  protocol.py read SENSOR_KEY_HEX SENSOR_ID NONCE REPLY_JSON
      an authenticated reply (its mac verifies and its nonce is NONCE): prints its body
      as compact JSON, with "opened_token" added when it carries a sealed token, which
      must open with the sensor's key; a reply without a mac that is not an `ok`
      (what onboardd sends to an announce it could not authenticate): prints it as it
      came. Anything else a sensor would ignore: exits 1 saying why.
"""
import hashlib
import hmac
import json
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def mac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def announce(key_hex: str, fields: str) -> None:
    sensor_key = bytes.fromhex(key_hex)
    nonce = os.urandom(16).hex()
    body = json.loads(fields)
    body["nonce"] = nonce
    b = compact(body)
    proof = mac(sensor_key, b"onboardd-announce-v2\n" + b.encode()).hex()
    print(nonce, compact({"body": b, "proof": proof}))


def read(key_hex: str, sensor_id: str, nonce: str, reply_text: str) -> None:
    sensor_key = bytes.fromhex(key_hex)
    reply = json.loads(reply_text)
    if "mac" not in reply:
        if reply.get("status") == "ok" or "body" in reply:
            sys.exit(f"an ok or a body without a mac, ignored: {reply_text}")
        print(compact(reply))
        return
    mac_key = mac(sensor_key, b"onboardd-mac-v2")
    want = mac(mac_key, b"onboardd-reply-v2\n" + reply["body"].encode()).hex()
    if not hmac.compare_digest(want, reply["mac"]):
        sys.exit(f"the reply's mac does not verify, ignored: {reply_text}")
    body = json.loads(reply["body"])
    if body.get("nonce") != nonce:
        sys.exit(f"the reply answers another announce (nonce {body.get('nonce')!r}), ignored")
    if "device_token" in body:
        sys.exit("a token in clear to a sensor holding a key, ignored")
    if "device_token_sealed" in body:
        seal_key = mac(sensor_key, b"onboardd-seal-v2")
        sealed = bytes.fromhex(body["device_token_sealed"])
        aad = f"{sensor_id}/{body['device_id']}/{nonce}".encode()
        try:
            body["opened_token"] = AESGCM(seal_key).decrypt(sealed[:12], sealed[12:], aad).decode()
        except Exception as e:  # InvalidTag says only "wrong key or damaged"
            sys.exit(f"the sealed token does not open with this sensor key: {e!r}")
    print(compact(body))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "announce":
        announce(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "read":
        read(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
