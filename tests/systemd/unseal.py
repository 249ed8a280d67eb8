#!/usr/bin/python3
"""Opens a sealed reply token as a sensor's firmware does (the service test's
check that a token is readable with the key the sensor was flashed with).

Usage: unseal.py SENSOR_KEY_HEX SENSOR_ID REPLY_JSON
Prints the device token; exits non-zero (with why) when it does not open.
The seal: AES-256-GCM under HMAC-SHA256(sensor_key, "onboardd-reply-v1"),
12-byte nonce first, additional data "SENSOR_ID/DEVICE_ID" (src/proof.rs).
"""
import hashlib
import hmac
import json
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

key_hex, sensor_id, reply_text = sys.argv[1:4]
reply = json.loads(reply_text)
sealed = bytes.fromhex(reply["device_token_sealed"])
reply_key = hmac.new(bytes.fromhex(key_hex), b"onboardd-reply-v1", hashlib.sha256).digest()
aad = f"{sensor_id}/{reply['device_id']}".encode()
try:
    print(AESGCM(reply_key).decrypt(sealed[:12], sealed[12:], aad).decode())
except Exception as e:  # InvalidTag says only "wrong key or damaged"
    sys.exit(f"the sealed token does not open with this sensor key: {e!r}")
