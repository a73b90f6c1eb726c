#!/usr/bin/env python3
"""Runs the examples of docs/examples against a running server and checks what they did.

Usage: examples.py BASE_URL ACCESS_TOKEN WRITE_KEY NODE_DIR

NODE_DIR holds copies of docs/examples/node/*.mjs next to the installed packages
(run.sh copies them into tests/clients/node/.examples: Node resolves packages from the
script's own folder). The Python examples run from docs/examples/python as they are.

1. Starts subscriber.mjs (CDP_TOKEN = the access token) and waits for its `connected` line.
2. Creates a segment "Buyers" (ordered at least once), then sends a probe order through
   /v1/track once a second until the subscriber has printed an event line and a segment
   entry: from then on both subscriptions are live (no fixed sleep).
3. Runs the four ingestion examples, each with its own USER_ID and EMAIL; each must exit 0.
4. Waits for the subscriber to print their four orders and four segment entries, then checks
   through GraphQL that each person exists with the email identity and 2 events.
5. Runs apollo_persisted.mjs (CDP_TOKEN = the access token): on this fresh server the query is
   unknown, so the wire must read GET by hash, POST with the query, then GET by hash.
6. Stops the subscriber with SIGTERM; it must exit 0.
Prints `examples: N passed, 0 failed` and exits 0 only when all passed.
"""

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from gql import GqlError, call

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PYTHON_EXAMPLES = os.path.join(ROOT, "docs", "examples", "python")

INGESTION = [
    # (name, command relative to its folder, folder)
    ("python/segment_ingest.py", [sys.executable, "segment_ingest.py"], PYTHON_EXAMPLES),
    ("python/rudderstack_ingest.py", [sys.executable, "rudderstack_ingest.py"], PYTHON_EXAMPLES),
    ("node/segment_ingest.mjs", ["node", "segment_ingest.mjs"], None),
    ("node/rudderstack_ingest.mjs", ["node", "rudderstack_ingest.mjs"], None),
]

PROFILE = """
query($v: String!) { profileByIdentity(kind: "user_id", value: $v) { eventCount identities { kind value } } }"""

SEGMENT = """
mutation($c: JSON!) { createSegment(input: {name: "Buyers", condition: $c}) { id } }"""


class Lines:
    """The lines a background process prints, read by a thread, waited for with deadlines."""

    def __init__(self, process):
        self.process = process
        self.lines = []
        self.queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.queue.put(line.rstrip("\n"))

    def wait_for(self, what, predicate, seconds=30, on_tick=None):
        deadline = time.monotonic() + seconds
        next_tick = time.monotonic()
        while not predicate(self.lines):
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"subscriber: no {what} within {seconds} s; it printed {self.lines}")
            if self.process.poll() is not None and self.queue.empty():
                raise AssertionError(f"subscriber exited ({self.process.returncode}) before {what}; it printed {self.lines}")
            if on_tick and now >= next_tick:
                on_tick()
                next_tick = now + 1
            try:
                self.lines.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                pass


def count(lines, pattern):
    return sum(1 for line in lines if re.search(pattern, line))


def track(url, write_key, user_id):
    body = json.dumps({"userId": user_id, "event": "Order Completed", "properties": {"revenue": 1}}).encode()
    request = urllib.request.Request(url + "/v1/track", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{write_key}:".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200, response.status


def run(name, command, cwd, env):
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"{name} exited {out.returncode}: {out.stdout}{out.stderr}")
    return out.stdout


def main(argv):
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    _, url, access_token, write_key, node_dir = argv
    env = dict(os.environ, CDP_URL=url)

    # Every example file must be run here: a new one fails this script until it is added.
    on_disk = {f"python/{f}" for f in os.listdir(PYTHON_EXAMPLES) if f.endswith(".py")}
    on_disk |= {f"node/{f}" for f in os.listdir(os.path.join(ROOT, "docs", "examples", "node")) if f.endswith(".mjs")}
    known = {name for name, _, _ in INGESTION} | {"node/subscriber.mjs", "node/apollo_persisted.mjs"}
    if on_disk != known:
        print(f"FAIL examples not run by examples.py: {sorted(on_disk - known)}; missing: {sorted(known - on_disk)}", file=sys.stderr)
        return 1
    passed, failed = 0, 0

    def result(name, check):
        nonlocal passed, failed
        try:
            detail = check()
            passed += 1
            print(f"ok   {name}{': ' + detail if detail else ''}")
        except (AssertionError, GqlError, subprocess.TimeoutExpired) as error:
            failed += 1
            print(f"FAIL {name}: {error}", file=sys.stderr)

    subscriber = subprocess.Popen(
        ["node", "subscriber.mjs"],
        cwd=node_dir,
        env=dict(env, CDP_TOKEN=access_token),
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    lines = Lines(subscriber)
    probes = 0
    try:
        lines.wait_for("connected line", lambda ls: count(ls, r"^subscriber: connected to ws://") == 1)
        call(url, SEGMENT, {"c": {"event": "Order Completed"}}, access_token)

        def probe():
            nonlocal probes
            probes += 1
            track(url, write_key, f"subscriber-probe-{probes}")

        lines.wait_for(
            "event line and segment entry for a probe",
            lambda ls: count(ls, r'^event track "Order Completed" profile=') >= 1 and count(ls, r"^segment \S+ entered profile=") >= 1,
            on_tick=probe,
        )

        users = {}
        for name, command, cwd in INGESTION:
            user_id = "example-" + re.sub(r"\W", "-", name)
            users[name] = user_id
            email = f"{user_id}@examples.test"
            result(name, lambda: run(name, command, cwd or node_dir, dict(env, WRITE_KEY=write_key, USER_ID=user_id, EMAIL=email)).strip())

        def seen_live():
            want = probes + len(INGESTION)
            lines.wait_for(
                f"{want} orders and {want} segment entries",
                lambda ls: count(ls, r'^event track "Order Completed" profile=') >= want
                and count(ls, r"^segment \S+ entered profile=") >= want,
            )
            return f"{len(INGESTION)} orders and segment entries printed live after {probes} probe(s)"

        result("node/subscriber.mjs", seen_live)

        def stored():
            for name, user_id in users.items():
                profile = call(url, PROFILE, {"v": user_id}, access_token)["profileByIdentity"]
                assert profile is not None, f"{name}: no profile for {user_id}"
                identities = {(i["kind"], i["value"]) for i in profile["identities"]}
                assert ("email", f"{user_id}@examples.test") in identities, f"{name}: identities {identities}"
                assert profile["eventCount"] == 2, f"{name}: eventCount {profile['eventCount']}"
            return "each person stored with the email identity and 2 events"

        result("ingestion examples, as stored", stored)

        def apollo():
            out = run("node/apollo_persisted.mjs", ["node", "apollo_persisted.mjs"], node_dir, dict(env, CDP_TOKEN=access_token))
            wire = "requests: GET 200 hash only, POST 200 with query, GET 200 hash only"
            assert wire in out, f"expected {wire!r} in {out!r}"
            return wire

        result("node/apollo_persisted.mjs", apollo)
    except (AssertionError, GqlError) as error:
        failed += 1
        print(f"FAIL {error}", file=sys.stderr)
    finally:
        if subscriber.poll() is None:
            subscriber.send_signal(signal.SIGTERM)
            try:
                code = subscriber.wait(timeout=10)
            except subprocess.TimeoutExpired:
                subscriber.kill()
                code = "killed after 10 s"
            if code != 0:
                failed += 1
                print(f"FAIL node/subscriber.mjs: on SIGTERM it exited {code}", file=sys.stderr)

    print(f"examples: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
