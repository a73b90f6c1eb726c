#!/usr/bin/env python3
"""Checks through GraphQL that what each client library sent became the right profile.

Usage: verify.py BASE_URL ACCESS_TOKEN MANIFEST EXPECTED_LIBRARIES

MANIFEST holds one JSON object a line, written by send.py and send.mjs. For each library:
  - profileByIdentity(kind: "user_id") exists, with the email trimmed and lower-cased and
    the phone in E.164, in its traits and as identities;
  - the alias joined the anonymous id to it (the anonymous track is on the same profile);
  - eventCount and the event types match what was sent; the track has its name and properties;
  - dataQuality for the library's api key shows every message accepted, no duplicate, no rejection.
Prints `clients: N passed, 0 failed` and exits 0 only when all EXPECTED_LIBRARIES passed.
"""

import json
import sys
from collections import Counter

from gql import GqlError, call

PROFILE = """
query($k: String!, $v: String!) {
  profileByIdentity(kind: $k, value: $v) {
    id traits eventCount identities { kind value }
    events(first: 100) { edges { node { type name properties } } }
  }
}"""

PROFILE_ID = """
query($k: String!, $v: String!) { profileByIdentity(kind: $k, value: $v) { id } }"""

DATA_QUALITY = """
{ dataQuality { name channel accepted duplicates rejected { reason count } warnings { reason count } } }"""


def check_library(url, token, sent, quality):
    """Returns the list of problems (empty when the library passed)."""
    problems = []
    profile = call(url, PROFILE, {"k": "user_id", "v": sent["userId"]}, token)["profileByIdentity"]
    if profile is None:
        return [f"no profile for user_id {sent['userId']}"]

    traits = profile["traits"] or {}
    if traits.get("email") != sent["email"]:
        problems.append(f"traits.email is {traits.get('email')!r}, expected {sent['email']!r} (sent {sent['rawEmail']!r})")
    if traits.get("phone") != sent["phone"]:
        problems.append(f"traits.phone is {traits.get('phone')!r}, expected {sent['phone']!r} (sent {sent['rawPhone']!r})")

    identities = {(i["kind"], i["value"]) for i in profile["identities"]}
    for kind, value in [
        ("user_id", sent["userId"]),
        ("anonymous_id", sent["anonymousId"]),
        ("email", sent["email"]),
        ("phone", sent["phone"]),
    ]:
        if (kind, value) not in identities:
            problems.append(f"identity {kind}={value} missing; identities are {sorted(identities)}")

    for kind, value in [("anonymous_id", sent["anonymousId"]), ("email", sent["email"]), ("phone", sent["phone"])]:
        other = call(url, PROFILE_ID, {"k": kind, "v": value}, token)["profileByIdentity"]
        if other is None or other["id"] != profile["id"]:
            problems.append(f"profileByIdentity({kind}, {value}) is {other}, expected the profile {profile['id']}")

    expected_count = len(sent["types"])
    if profile["eventCount"] != expected_count:
        problems.append(f"eventCount is {profile['eventCount']}, expected {expected_count}")

    events = [edge["node"] for edge in profile["events"]["edges"]]
    got_types, want_types = Counter(e["type"] for e in events), Counter(sent["types"])
    if got_types != want_types:
        problems.append(f"event types are {dict(got_types)}, expected {dict(want_types)}")
    tracked = [e for e in events if e["type"] == "track" and e["name"] == sent["event"]]
    if len(tracked) != 1:
        problems.append(f"expected one track named {sent['event']!r}; events are {[(e['type'], e['name']) for e in events]}")
    else:
        properties = tracked[0]["properties"] or {}
        for key, value in sent["properties"].items():
            if properties.get(key) != value:
                problems.append(f"track property {key} is {properties.get(key)!r}, expected {value!r}")

    sources = [q for q in quality if q["name"] == sent["source"]]
    if len(sources) != 1:
        problems.append(f"dataQuality has no single source named {sent['source']!r}: {[q['name'] for q in quality]}")
    else:
        source = sources[0]
        if source["accepted"] != expected_count:
            problems.append(f"dataQuality accepted {source['accepted']}, expected {expected_count}")
        if source["duplicates"] != 0:
            problems.append(f"dataQuality counted {source['duplicates']} duplicates")
        if source["rejected"]:
            problems.append(f"dataQuality rejected {source['rejected']}")
        if source["warnings"]:
            print(f"  note: {sent['library']}: dataQuality warnings {source['warnings']}")
    return problems


def main(argv):
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    _, url, token, manifest_path, expected = argv
    expected = int(expected)
    with open(manifest_path, encoding="utf-8") as manifest:
        sent_list = [json.loads(line) for line in manifest if line.strip()]
    quality = call(url, DATA_QUALITY, None, token)["dataQuality"]
    passed = failed = 0
    for sent in sent_list:
        try:
            problems = check_library(url, token, sent, quality)
        except GqlError as error:
            problems = [str(error)]
        if problems:
            failed += 1
            print(f"FAIL {sent['library']} (user {sent['userId']}):", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            passed += 1
            print(f"ok   {sent['library']}: profile, identities, {len(sent['types'])} events, data quality")
    # A library whose send step failed wrote no manifest line: it counts as failed too.
    failed += max(0, expected - len(sent_list))
    print(f"clients: {passed} passed, {failed} failed")
    return 0 if failed == 0 and passed == expected else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
