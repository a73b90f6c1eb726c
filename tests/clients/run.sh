#!/usr/bin/env bash
# Proves that real Segment and RudderStack client libraries work unchanged against cdp.
#
# Starts `cdp serve` on a free port with a fresh data directory (SQLite, mail as .eml files),
# creates a tenant and one WRITE api key per library, sends a customer journey through
# segment-analytics-python, rudder-sdk-python, @segment/analytics-node and
# @rudderstack/rudder-sdk-node (send.py, send.mjs), then checks the profiles, events and
# data-quality counts through GraphQL (verify.py).
# Then runs the examples of docs/examples against the same server (examples.py: the Python
# and Node ingestion examples, the graphql-ws subscriber in the background, Apollo Client with
# persisted queries) and follows docs/quickstart.md with its own GraphQL blocks in a tenant
# of its own (quickstart.py).
# Finally runs every runnable example of docs/api.md on a second, fresh server of the same
# binary that api_guide.py starts itself.
#
# Needs: python3 (with pip), node >= 18 and npm, and cargo unless CDP_BIN names a built
# `cdp` binary to use instead of building one. Installs the pinned libraries when missing:
# requirements.txt with pip, node/package-lock.json with npm ci.
# Prints `clients: 4 passed, 0 failed`, `examples: 7 passed, 0 failed`,
# `quickstart: 12 blocks passed`, `api guide: N blocks passed` and finally `clients: all passed`, and exits 0 on success.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

libraries=4
password="correct horse battery staple"

fail() {
  echo "clients: $*" >&2
  exit 1
}

for tool in python3 node npm; do
  command -v "$tool" >/dev/null || fail "$tool is required"
done
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 18 ] || fail "node >= 18 is required (found $(node --version))"

if [ -n "${CDP_BIN:-}" ]; then
  cdp="$CDP_BIN"
  echo "clients: using $cdp (CDP_BIN)"
else
  command -v cargo >/dev/null || fail "cargo is required (or set CDP_BIN to a built cdp binary)"
  echo "clients: building cdp"
  cargo build --quiet --bin cdp
  cdp="${CARGO_TARGET_DIR:-$root/target}/debug/cdp"
fi
[ -x "$cdp" ] || fail "no binary at $cdp"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/cdp-clients.XXXXXX")"
# Node resolves packages from a script's own folder, so the Node examples run as copies
# next to node/node_modules.
examples_dir="$here/node/.examples"
server_pid=""
cleanup() {
  status=$?
  rm -rf "$examples_dir"
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -s "$tmp/server.log" ]; then
    echo "clients: last lines of the server log:" >&2
    tail -n 40 "$tmp/server.log" >&2 || true
  fi
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
url="http://127.0.0.1:$port"

# A fresh SQLite database in the temporary data directory; no SMTP, so mail goes to $tmp/mail.
unset CDP_DATABASE_URL CDP_SMTP_URL CDP_PUBLIC_URL
export CDP_DATA_DIR="$tmp" CDP_LISTEN="127.0.0.1:$port" CDP_LOG="${CDP_LOG:-info}" NO_COLOR=1

"$cdp" serve >"$tmp/server.log" 2>&1 &
server_pid=$!

deadline=$((SECONDS + 60))
until python3 - "$url/readyz" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
do
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited before it was ready"
  [ "$SECONDS" -lt "$deadline" ] || fail "GET /readyz did not answer 200 within 60 s"
  sleep 0.2
done
echo "clients: server ready at $url"

created="$("$cdp" tenant create --slug clients --name Clients --owner-email owner@clients.test)"
token="$(printf '%s\n' "$created" | sed -n 's/.*activation link: .*activate?token=\([^[:space:]]*\).*/\1/p' | head -n 1)"
[ -n "$token" ] || fail "no activation link in the output of 'cdp tenant create': $created"

access_token="$(python3 "$here/gql.py" activate "$url" "$token" "$password")"
key_segment_python="$(python3 "$here/gql.py" api-key "$url" "$access_token" segment-python SERVER)"
key_rudder_python="$(python3 "$here/gql.py" api-key "$url" "$access_token" rudder-python SERVER)"
key_segment_node="$(python3 "$here/gql.py" api-key "$url" "$access_token" segment-node SERVER)"
key_rudder_node="$(python3 "$here/gql.py" api-key "$url" "$access_token" rudder-node SERVER)"
key_examples="$(python3 "$here/gql.py" api-key "$url" "$access_token" examples SERVER)"

# The Python libraries, pinned in requirements.txt, installed when missing or at another version.
if ! python3 - "$here/requirements.txt" <<'EOF'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        try:
            if metadata.version(name) != version:
                sys.exit(1)
        except metadata.PackageNotFoundError:
            sys.exit(1)
EOF
then
  echo "clients: installing the Python client libraries"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  python3 -m pip install --quiet -r "$here/requirements.txt" \
    || python3 -m pip install --quiet --break-system-packages -r "$here/requirements.txt"
fi

# The Node libraries, pinned in node/package-lock.json.
if ! npm ls --prefix "$here/node" >/dev/null 2>&1; then
  echo "clients: installing the Node client libraries"
  npm ci --prefix "$here/node" --no-audit --no-fund --loglevel=error
fi

manifest="$tmp/manifest.jsonl"
: >"$manifest"
sent=0
timeout 180 python3 "$here/send.py" "$url" "$key_segment_python" "$key_rudder_python" "$manifest" || sent=1
timeout 180 node "$here/send.mjs" "$url" "$key_segment_node" "$key_rudder_node" "$manifest" || sent=1

verified=0
python3 "$here/verify.py" "$url" "$access_token" "$manifest" "$libraries" || verified=1

# The examples of docs/examples, as a newcomer runs them, against the same server.
rm -rf "$examples_dir"
mkdir -p "$examples_dir"
cp "$root"/docs/examples/node/*.mjs "$examples_dir/"
examples=0
timeout 300 python3 "$here/examples.py" "$url" "$access_token" "$key_examples" "$examples_dir" || examples=1

# docs/quickstart.md, block by block, in a tenant of its own (mail in $tmp/mail).
quickstart=0
timeout 300 python3 "$here/quickstart.py" "$url" "$tmp/mail" || quickstart=1

# docs/api.md, every block marked <!-- run -->, on a fresh server of its own (the examples
# sign up the tenant `acme`, which quickstart.py already took here).
api_guide=0
timeout 300 python3 "$here/api_guide.py" "$cdp" || api_guide=1

[ "$sent" -eq 0 ] && [ "$verified" -eq 0 ] && [ "$examples" -eq 0 ] && [ "$quickstart" -eq 0 ] && [ "$api_guide" -eq 0 ] || exit 1
echo "clients: all passed"
