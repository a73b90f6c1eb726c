#!/usr/bin/env bash
# Vendor the offline GraphiQL page assets into api/assets/graphiql/.
#
# Fetches pinned npm tarballs with `npm pack` (only the npm registry is
# needed), extracts the UMD builds and LICENSE files, and writes a VERSIONS
# file. index.html in the destination directory is hand-written and is not
# touched by this script.
#
# GraphiQL 3.x's UMD bundle (graphiql.min.js) expects exactly two external
# globals, window.React and window.ReactDOM; everything else (graphql-js,
# @graphiql/react, @graphiql/toolkit, fonts as data: URIs in the CSS) is
# bundled. No other vendored files are needed.
#
# Usage: scripts/vendor-graphiql.sh   (from anywhere)
set -euo pipefail

GRAPHIQL_VERSION="3.8.3"
REACT_VERSION="18.3.1"
REACT_DOM_VERSION="18.3.1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${repo_root}/api/assets/graphiql"

command -v npm >/dev/null || { echo "error: npm not found in PATH" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

# fetch NAME VERSION -> extracts to $tmp/NAME
fetch() {
  local name="$1" version="$2" tgz
  echo "fetching ${name}@${version}" >&2
  tgz="$(cd "${tmp}" && npm pack --silent "${name}@${version}" | tail -n 1)"
  mkdir -p "${tmp}/${name}"
  tar -xzf "${tmp}/${tgz}" -C "${tmp}/${name}" --strip-components=1
}

# copy SRC DST, failing loudly if SRC is missing from the tarball
copy() {
  local src="$1" dst="$2"
  if [[ ! -f "${src}" ]]; then
    echo "error: expected file not found in package: ${src#"${tmp}/"}" >&2
    exit 1
  fi
  install -m 0644 "${src}" "${dest}/${dst}"
}

fetch graphiql "${GRAPHIQL_VERSION}"
fetch react "${REACT_VERSION}"
fetch react-dom "${REACT_DOM_VERSION}"

mkdir -p "${dest}"

copy "${tmp}/graphiql/graphiql.min.js"                     graphiql.min.js
copy "${tmp}/graphiql/graphiql.min.css"                    graphiql.min.css
copy "${tmp}/graphiql/LICENSE"                             LICENSE-graphiql
copy "${tmp}/react/umd/react.production.min.js"            react.production.min.js
copy "${tmp}/react/LICENSE"                                LICENSE-react
copy "${tmp}/react-dom/umd/react-dom.production.min.js"    react-dom.production.min.js
copy "${tmp}/react-dom/LICENSE"                            LICENSE-react-dom

# Files are copied byte-for-byte from the tarballs. graphiql.min.{js,css}
# end with a sourceMappingURL comment for a .map we don't ship; browsers only
# request it when DevTools is open, so it is left alone.

cat > "${dest}/VERSIONS" <<VERSIONS
# Vendored by scripts/vendor-graphiql.sh via \`npm pack\`; do not edit by hand.
graphiql ${GRAPHIQL_VERSION}
react ${REACT_VERSION}
react-dom ${REACT_DOM_VERSION}
VERSIONS

echo "vendored into ${dest}:" >&2
ls -l "${dest}" >&2
