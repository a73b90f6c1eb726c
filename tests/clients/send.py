#!/usr/bin/env python3
"""Sends a customer journey through the real Python client libraries, configured the way
their documentation says, and writes what each sent to a manifest for verify.py.

Usage: send.py BASE_URL SEGMENT_WRITE_KEY RUDDER_WRITE_KEY MANIFEST

  segment-analytics-python (import segment.analytics): module settings write_key, host;
      it posts to {host}/v1/batch with HTTP Basic auth.
  rudder-sdk-python (import rudderstack.analytics): module settings write_key,
      dataPlaneUrl; it posts gzip-compressed batches to {dataPlaneUrl}/v1/batch.

Each library: an anonymous track, identify (email with mixed case and spaces, a UK phone
with spaces), track with properties, page, group, alias (anonymous id -> user id), then
shutdown() (flush() and join()), which blocks until the queue is sent. Delivery errors come back
through on_error and fail the script.
"""

import json
import sys
import uuid
from importlib import metadata


def journey(prefix, phone_suffix):
    """The messages one library sends, and what the server should make of them."""
    run = uuid.uuid4().hex[:8]
    user_id = f"{prefix}-user-{run}"
    anonymous_id = f"{prefix}-anon-{run}"
    local = prefix.replace("-", ".")
    return {
        "userId": user_id,
        "anonymousId": anonymous_id,
        "rawEmail": f"  Ada.Lovelace+{local}@Example.COM ",
        "email": f"ada.lovelace+{local}@example.com",
        "rawPhone": f"+44 20 7946 {phone_suffix}",
        "phone": f"+44207946{phone_suffix}",
        "event": "Order Completed",
        "properties": {
            "order_id": f"order-{run}",
            "revenue": 42.5,
            "currency": "EUR",
            "products": [{"sku": "sku-1", "quantity": 2}],
        },
        "groupId": f"{prefix}-group-{run}",
    }


def send_segment(url, write_key, j):
    import segment.analytics as analytics

    errors = []
    analytics.write_key = write_key
    analytics.host = url
    analytics.max_retries = 1
    analytics.on_error = lambda error, batch: errors.append(f"{error!r} ({len(batch)} messages)")

    analytics.track(anonymous_id=j["anonymousId"], event="Product Viewed", properties={"sku": "sku-1"})
    analytics.identify(
        j["userId"],
        {"email": j["rawEmail"], "phone": j["rawPhone"], "name": "Ada Lovelace", "plan": "pro"},
    )
    analytics.track(j["userId"], j["event"], j["properties"])
    analytics.page(j["userId"], "Docs", "Pricing", {"path": "/pricing", "url": "https://example.com/pricing"})
    analytics.group(j["userId"], j["groupId"], {"name": "Analytical Engines Ltd", "employees": 12})
    analytics.alias(j["anonymousId"], j["userId"])
    analytics.shutdown()  # flush() and join(): blocks until the queue is sent
    return errors, ["track", "identify", "track", "page", "group", "alias"]


def send_rudder(url, write_key, j):
    import rudderstack.analytics as rudder_analytics

    errors = []
    rudder_analytics.write_key = write_key
    rudder_analytics.dataPlaneUrl = url
    rudder_analytics.max_retries = 1
    rudder_analytics.on_error = lambda error, batch: errors.append(f"{error!r} ({len(batch)} messages)")

    rudder_analytics.track(anonymous_id=j["anonymousId"], event="Product Viewed", properties={"sku": "sku-1"})
    rudder_analytics.identify(
        j["userId"],
        {"email": j["rawEmail"], "phone": j["rawPhone"], "name": "Ada Lovelace", "plan": "pro"},
    )
    rudder_analytics.track(j["userId"], j["event"], j["properties"])
    rudder_analytics.page(j["userId"], "Docs", "Pricing", {"path": "/pricing", "url": "https://example.com/pricing"})
    rudder_analytics.group(j["userId"], j["groupId"], {"name": "Analytical Engines Ltd", "employees": 12})
    rudder_analytics.alias(j["anonymousId"], j["userId"])
    rudder_analytics.shutdown()  # flush() and join()
    return errors, ["track", "identify", "track", "page", "group", "alias"]


LIBRARIES = [
    # (library, distribution, api key name, phone suffix, sender)
    ("segment-analytics-python", "segment-analytics-python", "segment-python", "0958", send_segment),
    ("rudder-sdk-python", "rudder-sdk-python", "rudder-python", "0959", send_rudder),
]


def main(argv):
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    _, url, segment_key, rudder_key, manifest_path = argv
    keys = {"segment-python": segment_key, "rudder-python": rudder_key}
    failed = 0
    with open(manifest_path, "a", encoding="utf-8") as manifest:
        for library, distribution, source, phone_suffix, sender in LIBRARIES:
            version = metadata.version(distribution)
            j = journey(source, phone_suffix)
            errors, types = sender(url, keys[source], j)
            if errors:
                failed += 1
                print(f"FAIL {library} {version}: delivery errors: {'; '.join(errors)}", file=sys.stderr)
                continue
            print(f"sent {library} {version}: {len(types)} messages as {j['userId']}")
            j.update({"library": f"{library} {version}", "source": source, "types": types})
            manifest.write(json.dumps(j) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
