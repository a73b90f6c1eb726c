#!/usr/bin/env python3
"""Sends a person and an order to the CDP with Segment's Python library.

Run:
    pip install segment-analytics-python==2.4.0
    CDP_URL=http://127.0.0.1:8080 WRITE_KEY=cdp_wk_... python3 segment_ingest.py

Environment:
    CDP_URL    the server's base address, without /v1 (default http://127.0.0.1:8080)
    WRITE_KEY  a WRITE api key of your tenant (createApiKey(name: ..., scope: WRITE))
    USER_ID    the person's user id (default user-42)
    EMAIL      the person's email (default ada@example.com)

Each run identifies the person and sends one "Order Completed" event: run it twice
and the person has ordered twice. Exits non-zero if the server refused anything.
"""

import os
import sys
import uuid

import segment.analytics as analytics

cdp_url = os.environ.get("CDP_URL", "http://127.0.0.1:8080")
write_key = os.environ["WRITE_KEY"]
user_id = os.environ.get("USER_ID", "user-42")
email = os.environ.get("EMAIL", "ada@example.com")

errors = []
analytics.write_key = write_key
analytics.host = cdp_url  # the library posts to {host}/v1/batch
analytics.on_error = lambda error, batch: errors.append(error)

analytics.identify(user_id, {"email": email, "firstName": "Ada", "plan": "pro"})
analytics.track(user_id, "Order Completed", {"order_id": uuid.uuid4().hex[:8], "revenue": 42.5, "currency": "EUR"})
analytics.shutdown()  # flush() and join(): returns once the queue is sent

if errors:
    print(f"segment_ingest.py: delivery failed: {errors}", file=sys.stderr)
    sys.exit(1)
print(f"segment_ingest.py: sent identify and Order Completed for {user_id}")
