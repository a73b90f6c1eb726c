#!/usr/bin/env python3
"""A tiny GraphQL client for tests/clients (standard library only).

As a module: `call(url, query, variables, token)` returns `data` or raises GqlError.
As a command:
  gql.py activate URL TOKEN PASSWORD        prints the access token
  gql.py api-key URL ACCESS_TOKEN NAME CHANNEL   prints a WRITE key's secret
"""

import json
import sys
import urllib.error
import urllib.request


class GqlError(Exception):
    pass


def call(url, query, variables=None, token=None, timeout=30):
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/graphql",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        raise GqlError(f"POST /graphql answered {error.code}: {text}") from None
    if payload.get("errors"):
        raise GqlError(f"GraphQL errors: {json.dumps(payload['errors'])}")
    return payload["data"]


ACTIVATE = """
mutation($token: String!, $password: String!) {
  activateAccount(token: $token, password: $password) { accessToken }
}"""

CREATE_API_KEY = """
mutation($name: String!, $channel: SourceChannel!) {
  createApiKey(name: $name, scope: WRITE, channel: $channel) { secret }
}"""


def main(argv):
    if len(argv) == 5 and argv[1] == "activate":
        _, _, url, token, password = argv
        data = call(url, ACTIVATE, {"token": token, "password": password})
        print(data["activateAccount"]["accessToken"])
        return 0
    if len(argv) == 6 and argv[1] == "api-key":
        _, _, url, access_token, name, channel = argv
        data = call(url, CREATE_API_KEY, {"name": name, "channel": channel}, access_token)
        print(data["createApiKey"]["secret"])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except GqlError as error:
        print(f"gql.py: {error}", file=sys.stderr)
        sys.exit(1)
