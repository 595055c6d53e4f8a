#!/usr/bin/env python3
"""Writes a JWKS and a long-lived RS256 token for the bench (`bench/ab.sh`
with a `jwt` plugin), with the test key in gateway/tests/fixtures/rsa.pem and
the openssl command line: no Python crypto package needed.

  python3 bench/jwt_fixture.py DIR    # DIR/jwks.json, DIR/token
"""

import base64
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = os.path.join(ROOT, "gateway", "tests", "fixtures", "rsa.pem")


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    modulus = subprocess.run(["openssl", "rsa", "-in", KEY, "-noout", "-modulus"],
                             capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    jwks = {"keys": [{"kty": "RSA", "kid": "bench-1", "alg": "RS256", "use": "sig",
                      "n": b64(bytes.fromhex(modulus)), "e": "AQAB"}]}
    with open(os.path.join(out, "jwks.json"), "w") as f:
        json.dump(jwks, f)
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench-1"}).encode())
    claims = {"sub": "bench", "iss": "https://issuer.example", "aud": "bench", "exp": int(time.time()) + 86400}
    payload = b64(json.dumps(claims).encode())
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", KEY],
                               input=f"{header}.{payload}".encode(), capture_output=True, check=True).stdout
    with open(os.path.join(out, "token"), "w") as f:
        f.write(f"{header}.{payload}.{b64(signature)}")
    print(os.path.join(out, "jwks.json"))


if __name__ == "__main__":
    main()
