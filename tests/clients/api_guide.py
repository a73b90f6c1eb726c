#!/usr/bin/env python3
"""Runs the examples of docs/api.md against a fresh server, with the page's own text.

Usage: api_guide.py CDP_BIN

Starts `CDP_BIN serve` on a free port with a fresh data directory (SQLite, mail as .eml files),
then sends, in page order, every ```graphql block that an HTML comment `<!-- run … -->` precedes.
The comment's options:

  token=NAME      send the saved value NAME as the bearer token (default: TOKEN once saved;
                  `token=none` sends none)
  save=NAME=PATH  keep the answer's value at PATH (dots, list indices: `createApiKey.secret`,
                  `users.edges.0.node.id`) as NAME; `<NAME>` is then filled in later blocks
  mail=ADDRESS    fill `<ACTIVATION_TOKEN>` / `<RESET_TOKEN>` from the newest email to ADDRESS
  expect=CODE     the block must fail with extensions.code CODE (else any error fails the run)
  wait=PATH       send the block again (for up to 30 s) until the answer's value at PATH is truthy

A ```json block right after the graphql block (at most one line of text between) is its
variables when it has no `data`/`errors` key, and its answer when it has one: every key the page
shows must be in the real answer (the values are not compared: ids and times differ), and an
expected error's code must be the one the page shows.
A subscription block is opened over /graphql/ws (graphql-transport-ws) and must receive a
`next` without errors once the following runnable block has run.
A ```json block preceded by `<!-- batch -->` is POSTed to /v1/batch with the saved WRITE_KEY
(and triggers the open subscriptions like a runnable block).
Every field of Query, Mutation and Subscription in `CDP_BIN schema` must be the root field of some
runnable block. Prints `api guide: N blocks passed` and exits 0. With API_GUIDE_SHOW=1 it also prints every real
answer as a JSON line {"step": k, "answer": …} on stderr (k counts the runnable blocks from 0).
"""

import base64
import email
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from gql import GqlError, Socket, post

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PAGE = os.path.join(ROOT, "docs", "api.md")
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>")


class Failed(Exception):
    pass


def parse(text):
    """The page as a list of items: ('marker', kind, options) and ('block', lang, body, gap),
    where gap is the text between the previous item and the block."""
    items, lines, i, gap = [], text.split("\n"), 0, []
    while i < len(lines):
        line = lines[i]
        marker = re.match(r"^<!-- (run|batch)\b(.*?)-->\s*$", line)
        fence = re.match(r"^```(\w*)\s*$", line)
        if marker:
            items.append(("marker", marker.group(1), marker.group(2).split()))
            gap = []
        elif fence:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            items.append(("block", fence.group(1), "\n".join(lines[i + 1:j]) + "\n", gap))
            gap, i = [], j
        else:
            gap.append(line)
        i += 1
    return items


def steps(items):
    """Runnable steps: dicts with kind, options, query, variables, answer."""
    out = []
    for n, item in enumerate(items):
        if item[0] != "marker":
            continue
        following = items[n + 1] if n + 1 < len(items) else None
        if not following or following[0] != "block" or any(l.strip() for l in following[3]):
            raise Failed(f"<!-- {item[1]} --> is not right above a fenced block")
        if item[1] == "batch":
            out.append({"kind": "batch", "body": following[2]})
            continue
        if following[1] != "graphql":
            raise Failed("<!-- run --> must precede a ```graphql block")
        step = {"kind": "run", "index": sum(1 for o in out if o["kind"] == "run"), "options": item[2], "query": following[2], "variables": None, "answer": None}
        for later in items[n + 2:]:
            if later[0] != "block" or later[1] != "json" or sum(1 for l in later[3] if l.strip()) > 1:
                break
            value = json.loads(later[2])
            if isinstance(value, dict) and ("data" in value or "errors" in value):
                step["answer"] = value
            else:
                step["variables"] = later[2]
        out.append(step)
    return out


def options(words):
    result = {"save": []}
    for word in words:
        key, _, value = word.partition("=")
        if key == "save":
            name, _, path = value.partition("=")
            result["save"].append((name, path))
        elif key in ("token", "mail", "expect", "wait"):
            result[key] = value
        else:
            raise Failed(f"unknown run option {word!r}")
    return result


def at(value, path):
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def same_shape(shown, real, where="answer"):
    """Every key the page shows is in the real answer."""
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            raise Failed(f"{where}: the page shows an object, the server answered {json.dumps(real)[:200]}")
        for key, value in shown.items():
            if key not in real:
                raise Failed(f"{where}: the page shows {key!r}, the answer has only {sorted(real)}")
            same_shape(value, real[key], f"{where}.{key}")
    elif isinstance(shown, list) and shown and isinstance(shown[0], (dict, list)):
        if not isinstance(real, list) or not real:
            raise Failed(f"{where}: the page shows items, the server answered {json.dumps(real)[:200]}")
        for item in shown:
            errors = []
            for candidate in real:
                try:
                    same_shape(item, candidate, where + "[]")
                    break
                except Failed as error:
                    errors.append(error)
            else:
                raise errors[0]


def fill(text, values):
    def one(match):
        name = match.group(1)
        if name not in values:
            raise Failed(f"no value yet for <{name}>")
        return values[name]
    return PLACEHOLDER.sub(one, text)


def poll(what, check, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"{what} did not happen within {seconds} s")
        time.sleep(0.2)


def mail_token(mail_dir, address, prefix):
    def newest():
        found = []
        for path in glob.glob(os.path.join(mail_dir, "*.eml")):
            with open(path, encoding="utf-8") as file:
                message = email.message_from_file(file)
            if message["To"] != address:
                continue
            for part in message.walk():
                if part.get_content_type() == "text/plain":
                    body = part.get_payload(decode=True).decode()
                    match = re.search(r"token=(" + prefix + r"_[A-Za-z0-9_\-]+)", body)
                    if match:
                        found.append((os.path.getmtime(path), path, match.group(1)))
        return max(found)[2] if found else None
    return poll(f"an email to {address} with a {prefix}_ token", newest)


def start_server(binary, data_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("CDP_DATABASE_URL", "CDP_SMTP_URL", "CDP_PUBLIC_URL")}
    env.update(CDP_DATA_DIR=data_dir, CDP_LISTEN=f"127.0.0.1:{port}", CDP_LOG=env.get("CDP_LOG", "info"), NO_COLOR="1")
    log = open(os.path.join(data_dir, "server.log"), "wb")
    process = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if process.poll() is not None:
            raise Failed("the server exited before it was ready")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False
    poll("GET /readyz answering 200", ready, 60)
    return process, url


def send_batch(url, write_key, body):
    request = urllib.request.Request(url + "/v1/batch", data=body.encode(), method="POST", headers={
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode(),
    })
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    if answer.get("success") is not True:
        raise Failed(f"/v1/batch answered {answer}")


def run(url, mail_dir, page_steps):
    values, sent, pending = {}, 0, []
    for step in page_steps:
        if step["kind"] == "batch":
            if "WRITE_KEY" not in values:
                raise Failed("<!-- batch --> before a WRITE_KEY was saved")
            send_batch(url, values["WRITE_KEY"], fill(step["body"], values))
            check_subscriptions(pending)
            pending = []
            continue
        opts = options(step["options"])
        query = step["query"]
        if "mail" in opts:
            if "<ACTIVATION_TOKEN>" in query:
                values["ACTIVATION_TOKEN"] = mail_token(mail_dir, opts["mail"], "act")
            if "<RESET_TOKEN>" in query:
                values["RESET_TOKEN"] = mail_token(mail_dir, opts["mail"], "rst")
        query = fill(query, values)
        variables = json.loads(fill(step["variables"], values)) if step["variables"] else None
        token_name = opts.get("token", "TOKEN")
        token = None if token_name == "none" else values.get(token_name)
        if token_name not in ("none", "TOKEN") and token is None:
            raise Failed(f"no saved token {token_name}")
        first_line = query.strip().splitlines()[0]

        if query.lstrip().startswith("subscription"):
            socket_ = Socket(url, token)
            socket_.subscribe("1", query, variables)
            pending.append((step, socket_))
            sent += 1
            continue

        status, answer = post(url, query, variables, token)
        if "wait" in opts:
            def arrived():
                again = post(url, query, variables, token)
                try:
                    return again if at(again[1]["data"], opts["wait"]) else None
                except (KeyError, IndexError, TypeError):
                    return None
            status, answer = poll(f"{opts['wait']} of {first_line}", arrived)
        errors = answer.get("errors")
        if "expect" in opts:
            codes = [e.get("extensions", {}).get("code") for e in errors or []]
            if opts["expect"] not in codes:
                raise Failed(f"{first_line}: expected {opts['expect']}, got HTTP {status} {json.dumps(answer)}")
            if step["answer"]:
                shown = [e.get("extensions", {}).get("code") for e in step["answer"].get("errors", [])]
                if shown and shown != codes:
                    raise Failed(f"{first_line}: the page shows {shown}, the server answered {codes}")
        else:
            if errors or status != 200:
                raise Failed(f"{first_line}: HTTP {status} {json.dumps(errors)}")
            if step["answer"]:
                same_shape(step["answer"], answer)
            for name, path in opts["save"]:
                try:
                    values[name] = str(at(answer["data"], path))
                except (KeyError, IndexError, ValueError, TypeError):
                    raise Failed(f"{first_line}: no {path} in {json.dumps(answer)[:300]}") from None
        show(step, answer)
        sent += 1

        check_subscriptions(pending)
        pending = []
    if pending:
        raise Failed("a subscription block is the last runnable block: nothing triggers it")
    return sent


def show(step, answer):
    """With API_GUIDE_SHOW=1, prints each real answer as a JSON line on stderr (to refresh the page)."""
    if os.environ.get("API_GUIDE_SHOW"):
        print(json.dumps({"step": step["index"], "answer": answer}), file=sys.stderr)


def check_subscriptions(pending):
    """Each open subscription must have received a `next` without errors."""
    for step, socket_ in pending:
        line, shown = step["query"].strip().splitlines()[0], step["answer"]
        message = socket_.receive(15)
        socket_.close()
        if not message or message.get("type") != "next":
            raise Failed(f"{line}: no `next` within 15 s after the following block ({message})")
        if message["payload"].get("errors"):
            raise Failed(f"{line}: {json.dumps(message['payload'])}")
        show(step, message["payload"])
        if shown:
            same_shape(shown, message["payload"])


def root_fields(binary):
    """The field names of Query, Mutation and Subscription in the served schema."""
    sdl = subprocess.run([binary, "schema"], capture_output=True, text=True, check=True).stdout
    sdl = re.sub(r'"""(.*?)"""', "", sdl, flags=re.S)
    names = []
    for kind in ("Query", "Mutation", "Subscription"):
        body = re.search(r"^type " + kind + r" \{(.*?)^\}", sdl, re.S | re.M).group(1)
        names += [f"{kind}.{name}" for name in re.findall(r"^\s+(\w+)\s*[(:]", body, re.M)]
    return names


def uncovered(names, page_steps):
    """The root fields that no runnable block selects at its top level."""
    selected = set()
    for step in page_steps:
        if step["kind"] != "run":
            continue
        query = re.sub(r"#[^\n]*", "", step["query"])
        operation = "Subscription" if query.lstrip().startswith("subscription") else (
            "Mutation" if query.lstrip().startswith("mutation") else "Query")
        depth, start = 0, None
        for i, char in enumerate(query):
            if char == "{":
                depth += 1
                if depth == 1:
                    start = i
            elif char == "}":
                depth -= 1
        # the top-level selection: the text at depth 1, without nested selections and arguments
        top, depth, paren = [], 0, 0
        for char in query[start:]:
            if char == "{":
                depth += 1
                continue
            if char == "}":
                depth -= 1
                continue
            if char == "(":
                paren += 1
            elif char == ")":
                paren -= 1
            elif depth == 1 and paren == 0:
                top.append(char)
        for name in re.findall(r"(?:(\w+)\s*:\s*)?(\w+)", "".join(top)):
            selected.add(f"{operation}.{name[1]}")
    return [name for name in names if name not in selected]


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(PAGE, encoding="utf-8") as file:
        page_steps = steps(parse(file.read()))
    missing = uncovered(root_fields(argv[1]), page_steps)
    if missing:
        raise Failed(f"no runnable example of {', '.join(missing)}")
    data_dir = tempfile.mkdtemp(prefix="cdp-api-guide.")
    process = None
    try:
        process, url = start_server(argv[1], data_dir)
        sent = run(url, os.path.join(data_dir, "mail"), page_steps)
    except BaseException:
        log = os.path.join(data_dir, "server.log")
        if os.path.exists(log):
            with open(log, encoding="utf-8", errors="replace") as file:
                tail = file.read().splitlines()[-30:]
            print("api guide: last lines of the server log:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        if process:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"api guide: {sent} blocks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (Failed, GqlError, AssertionError, OSError, ValueError) as error:
        print(f"api guide: FAIL {error!r}", file=sys.stderr)
        sys.exit(1)
