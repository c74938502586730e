#!/usr/bin/env python3
"""An unmodified Easemob caller, switched to the sidecar by its base URL alone.

This is how a service calls Easemob's REST API directly: a base URL, an App Token from the token endpoint, then
the call. Pointed at the gateway (EASEMOB_BASE_URL=http://127.0.0.1:8080/<org>/<app>), the same code works
unchanged: the token endpoint answers with a placeholder (the real token never leaves the gateway), the
placeholder is dropped on the way, and the call reaches Easemob with the gateway's token, under its quota.

    EASEMOB_BASE_URL=http://127.0.0.1:8080/1122161011178276/demo deploy/example/caller.py alice bob 1100000000000000001

Standard library only. With `easemob-gateway demo` running, the line above deletes one of alice's messages with bob.
"""
import json
import os
import sys
import urllib.request

BASE = os.environ.get("EASEMOB_BASE_URL", "https://a1.easemob.com/1122161011178276/demo")


def call(method, path, body=None, token=None):
    request = urllib.request.Request(BASE + path, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def main(owner, peer, message_id):
    # Step 1, as Easemob's server SDKs do: an App Token from the client credentials.
    status, grant = call("POST", "/token", {
        "grant_type": "client_credentials",
        "client_id": os.environ.get("EASEMOB_CLIENT_ID", "not-needed-behind-the-gateway"),
        "client_secret": os.environ.get("EASEMOB_CLIENT_SECRET", "not-needed-behind-the-gateway"),
    })
    if status != 200:
        sys.exit(f"token: {status} {grant}")
    # Step 2: the deletion, with that token.
    path = f"/rest/message/roaming/chat/user/{owner}?userId={peer}&msgIdList={message_id}"
    status, answer = call("DELETE", path, token=grant["access_token"])
    print(status, json.dumps(answer))
    sys.exit(0 if status == 200 else 1)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
