#!/usr/bin/env python3
"""Sends a person and an order to the CDP with RudderStack's Python library.

Run:
    pip install rudder-sdk-python==2.1.9
    CDP_URL=http://127.0.0.1:8080 WRITE_KEY=cdp_wk_... python3 rudderstack_ingest.py

Environment:
    CDP_URL    the server's base address, without /v1 (default http://127.0.0.1:8080)
    WRITE_KEY  a WRITE api key of your tenant (createApiKey(name: ..., scope: WRITE))
    USER_ID    the person's user id (default user-42)
    EMAIL      the person's email (default ada@example.com)

Each run identifies the person and sends one "Order Completed" event.
The library sends gzip-compressed batches, and identify traits as context.traits;
the server reads both. Exits non-zero if the server refused anything.
"""

import os
import sys
import uuid

import rudderstack.analytics as rudder_analytics

cdp_url = os.environ.get("CDP_URL", "http://127.0.0.1:8080")
write_key = os.environ["WRITE_KEY"]
user_id = os.environ.get("USER_ID", "user-42")
email = os.environ.get("EMAIL", "ada@example.com")

errors = []
rudder_analytics.write_key = write_key
rudder_analytics.dataPlaneUrl = cdp_url  # the library posts to {dataPlaneUrl}/v1/batch
rudder_analytics.on_error = lambda error, batch: errors.append(error)

rudder_analytics.identify(user_id, {"email": email, "firstName": "Ada", "plan": "pro"})
rudder_analytics.track(user_id, "Order Completed", {"order_id": uuid.uuid4().hex[:8], "revenue": 42.5, "currency": "EUR"})
rudder_analytics.shutdown()  # flush() and join()

if errors:
    print(f"rudderstack_ingest.py: delivery failed: {errors}", file=sys.stderr)
    sys.exit(1)
print(f"rudderstack_ingest.py: sent identify and Order Completed for {user_id}")
