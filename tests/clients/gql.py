#!/usr/bin/env python3
"""A tiny GraphQL client for tests/clients (standard library only).

As a module: `call(url, query, variables, token)` returns `data` or raises GqlError;
`post(url, query, variables, token)` returns (HTTP status, the whole JSON answer), errors included;
`Socket(url, token)` is a minimal graphql-transport-ws client over /graphql/ws.
As a command:
  gql.py activate URL TOKEN PASSWORD        prints the access token
  gql.py api-key URL ACCESS_TOKEN NAME CHANNEL   prints a WRITE key's secret
"""

import base64
import json
import os
import socket
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request


class GqlError(Exception):
    pass


def _request(url, query, variables, token):
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/graphql",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    if token:
        request.add_header("Authorization", "Bearer " + token)
    return request


def post(url, query, variables=None, token=None, timeout=30):
    """Sends one operation; returns (HTTP status, the JSON answer) whatever the status."""
    try:
        with urllib.request.urlopen(_request(url, query, variables, token), timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except ValueError:
            raise GqlError(f"POST /graphql answered {error.code}: {text}") from None


def call(url, query, variables=None, token=None, timeout=30):
    try:
        with urllib.request.urlopen(_request(url, query, variables, token), timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        raise GqlError(f"POST /graphql answered {error.code}: {text}") from None
    if payload.get("errors"):
        raise GqlError(f"GraphQL errors: {json.dumps(payload['errors'])}")
    return payload["data"]


class Socket:
    """A minimal graphql-transport-ws client (text frames only), enough for tests.

    Socket(url, token) connects to /graphql/ws and waits for connection_ack;
    subscribe(id, query, variables) starts a subscription; receive(timeout) returns the next
    message as a dict (pings are answered), or None when the timeout passes first.
    """

    def __init__(self, url, token, timeout=10):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET /graphql/ws HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise GqlError("the WebSocket closed during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise GqlError(f"the WebSocket upgrade was refused: {head.decode(errors='replace')}")
        self.buffer = b""
        self.send({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"} if token else {}})
        ack = self.receive(timeout)
        if not ack or ack.get("type") != "connection_ack":
            raise GqlError(f"no connection_ack: {ack}")

    def send(self, message):
        data = json.dumps(message).encode()
        mask = os.urandom(4)
        if len(data) < 126:
            head = struct.pack("!BB", 0x81, 0x80 | len(data))
        elif len(data) < 65536:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, len(data))
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, len(data))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def subscribe(self, id, query, variables=None):
        self.send({"type": "subscribe", "id": id, "payload": {"query": query, "variables": variables or {}}})

    def _read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GqlError("the WebSocket closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def receive(self, timeout=10):
        self.sock.settimeout(timeout)
        try:
            while True:
                first, second = self._read(2)
                length = second & 0x7F
                if length == 126:
                    length, = struct.unpack("!H", self._read(2))
                elif length == 127:
                    length, = struct.unpack("!Q", self._read(8))
                payload = self._read(length)
                opcode = first & 0x0F
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    raise GqlError(f"the WebSocket closed with {code}: {payload[2:].decode(errors='replace')}")
                if opcode == 0x1:
                    message = json.loads(payload)
                    if message.get("type") == "ping":
                        self.send({"type": "pong"})
                        continue
                    return message
        except socket.timeout:
            return None

    def close(self):
        try:
            self.sock.sendall(struct.pack("!BB", 0x88, 0x80) + os.urandom(4))
        finally:
            self.sock.close()


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
