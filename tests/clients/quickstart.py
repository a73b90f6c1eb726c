#!/usr/bin/env python3
"""Follows docs/quickstart.md against a running server, with the page's own text.

Usage: quickstart.py BASE_URL MAIL_DIR

Sends every ```graphql block of the page, in order, with its placeholders (act_…,
PROFILE_ID, SEGMENT_ID, CAMPAIGN_ID) filled in from earlier answers and the token from the
activation email in MAIL_DIR (decoded with the page's own one-liner), and checks the answers.
Runs docs/examples/python/segment_ingest.py where the page does, with the WRITE key the page
made. Subscription blocks are not sent over HTTP: they must appear verbatim in
docs/examples/node/subscriber.mjs, which run.sh runs; every line of the python and js blocks must
be a line of docs/examples/python/segment_ingest.py and subscriber.mjs. The campaign email must land in MAIL_DIR (no SMTP).
Needs a server without a tenant `acme`. Prints `quickstart: N blocks passed` and exits 0.
"""

import email
import glob
import os
import re
import subprocess
import sys
import time

from gql import GqlError, call

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PAGE = os.path.join(ROOT, "docs", "quickstart.md")
SUBSCRIBER = os.path.join(ROOT, "docs", "examples", "node", "subscriber.mjs")
SEGMENT_INGEST = os.path.join(ROOT, "docs", "examples", "python", "segment_ingest.py")


class Failed(Exception):
    pass


def blocks(text):
    """The page's fenced blocks as (language, body), in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def poll(what, check, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"{what} did not happen within {seconds} s")
        time.sleep(0.2)


def activation_token(mail_dir, one_liner):
    """Runs the page's shell one-liner in a folder whose data/mail holds only acme's email."""
    def acme_mail():
        for path in glob.glob(os.path.join(mail_dir, "*.eml")):
            with open(path, encoding="utf-8") as file:
                if email.message_from_file(file)["To"] == "you@acme.test":
                    return path
        return None

    path = poll("the activation email to you@acme.test", acme_mail)
    scratch = os.path.join(mail_dir, "..", "quickstart-scratch")
    os.makedirs(os.path.join(scratch, "data", "mail"), exist_ok=True)
    with open(path, "rb") as source, open(os.path.join(scratch, "data", "mail", "a.eml"), "wb") as copy:
        copy.write(source.read())
    out = subprocess.run(["sh", "-c", one_liner], cwd=scratch, capture_output=True, text=True, check=True)
    token = out.stdout.strip()
    if not token.startswith("act_"):
        raise Failed(f"the one-liner printed {token!r}, not an act_ token")
    return token


def ingest(url, write_key):
    env = dict(os.environ, CDP_URL=url, WRITE_KEY=write_key)
    env.pop("USER_ID", None)
    env.pop("EMAIL", None)
    out = subprocess.run([sys.executable, SEGMENT_INGEST], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or "for user-42" not in out.stdout:
        raise Failed(f"segment_ingest.py failed: {out.stdout} {out.stderr}")


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    _, url, mail_dir = argv
    with open(PAGE, encoding="utf-8") as file:
        page = blocks(file.read())
    with open(SUBSCRIBER, encoding="utf-8") as file:
        subscriber = file.read()
    with open(SEGMENT_INGEST, encoding="utf-8") as file:
        segment_ingest = file.read()

    one_liner = next(body for lang, body in page if lang == "sh" and "get_payload(decode=True)" in body).strip()
    python_block = next(body for lang, body in page if lang == "python")
    for line in python_block.strip().splitlines():
        if line.strip() and line not in segment_ingest.splitlines():
            raise Failed(f"the python line {line!r} of the page is not in docs/examples/python/segment_ingest.py")
    for lang, body in page:
        if lang == "js":
            for line in body.strip().splitlines():
                if line.strip() not in subscriber:
                    raise Failed(f"the js line {line.strip()!r} of the page is not in subscriber.mjs")

    values, token, write_key, sent = {}, None, None, 0
    for lang, body in [b for b in page if b[0] == "graphql"]:
        query = body
        if query.lstrip().startswith("subscription"):
            if query.strip() not in subscriber:
                raise Failed(f"subscription block not verbatim in subscriber.mjs: {query.strip()}")
            sent += 1
            continue
        if "act_…" in query:
            query = query.replace("act_…", activation_token(mail_dir, one_liner))
        for name, value in values.items():
            query = query.replace(name, value)
        if "CAMPAIGN_ID" in body and "emailDeliveries" in body:
            # The last block: wait until the email went out, then check it landed.
            def sent_once():
                data = call(url, query, None, token)
                return data if data["campaign"]["stats"]["sent"] == 1 else None
            data = poll("the campaign email", sent_once)
            deliveries = [e["node"] for e in data["emailDeliveries"]["edges"]]
            if [(d["to"], d["status"]) for d in deliveries] != [("ada@example.com", "SENT")]:
                raise Failed(f"emailDeliveries: {deliveries}")
            sent += 1
            continue
        data = call(url, query, None, token)
        sent += 1
        (field, answer), = data.items()
        if field == "signUp":
            assert answer["user"]["status"] == "PENDING", answer
        elif field == "activateAccount":
            token = answer["accessToken"]
        elif field == "createApiKey" and "apiKey" in answer:
            write_key = answer["secret"]
            assert write_key.startswith("cdp_wk_"), answer
            ingest(url, write_key)  # step 3 runs the script right after the keys are made
        elif field == "createApiKey":
            token = answer["secret"]
            assert token.startswith("cdp_sk_"), answer
        elif field == "profileByIdentity":
            assert answer["eventCount"] == 2 and answer["traits"]["email"] == "ada@example.com", answer
            assert answer["consents"] == [], answer
            values["PROFILE_ID"] = answer["id"]
        elif field == "createSegment":
            assert answer["size"] == 0, answer
            values["SEGMENT_ID"] = answer["id"]
        elif field == "setConsent":
            assert answer["consents"][0]["granted"] is True, answer
        elif field == "createCampaign":
            assert answer["status"] == "DRAFT" and answer["trigger"]["kind"] == "segmentEntered", answer
            values["CAMPAIGN_ID"] = answer["id"]
        elif field == "setCampaignStatus":
            assert answer["status"] == "ACTIVE", answer
            ingest(url, write_key)  # the second order: user-42 enters the segment
        else:
            raise Failed(f"a block the checker does not know: {field}")

    def campaign_mail():
        for path in glob.glob(os.path.join(mail_dir, "*.eml")):
            with open(path, encoding="utf-8") as file:
                message = email.message_from_file(file)
            if message["To"] == "ada@example.com":
                return message
        return None

    message = poll("the campaign email in the mailbox folder", campaign_mail)
    if message["Subject"] != "Thank you, Ada" or not message["List-Unsubscribe"]:
        raise Failed(f"campaign email: subject {message['Subject']!r}, List-Unsubscribe {message['List-Unsubscribe']!r}")
    print(f"quickstart: {sent} blocks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (Failed, GqlError, AssertionError) as error:
        print(f"quickstart: FAIL {error!r}", file=sys.stderr)
        sys.exit(1)
