// Sends a person and an order to the CDP with Segment's Node library.
//
// Run (Node 20 or later):
//   npm install @segment/analytics-node@3.1.0
//   CDP_URL=http://127.0.0.1:8080 WRITE_KEY=cdp_wk_... node segment_ingest.mjs
//
// Environment:
//   CDP_URL    the server's base address, without /v1 (default http://127.0.0.1:8080)
//   WRITE_KEY  a WRITE api key of your tenant (createApiKey(name: ..., scope: WRITE))
//   USER_ID    the person's user id (default user-42)
//   EMAIL      the person's email (default ada@example.com)
//
// Each run identifies the person and sends one "Order Completed" event.
// Exits non-zero if the server refused anything.

import { randomUUID } from 'node:crypto';
import { Analytics } from '@segment/analytics-node';

const cdpUrl = process.env.CDP_URL ?? 'http://127.0.0.1:8080';
const writeKey = process.env.WRITE_KEY;
const userId = process.env.USER_ID ?? 'user-42';
const email = process.env.EMAIL ?? 'ada@example.com';
if (!writeKey) {
  console.error('segment_ingest.mjs: set WRITE_KEY');
  process.exit(2);
}

// The library posts to {host}/v1/batch with the write key as HTTP Basic user name.
const analytics = new Analytics({ writeKey, host: cdpUrl });
const errors = [];
analytics.on('error', (error) => errors.push(error));

// Each call's callback reports whether that message was delivered.
const delivered = (message) => new Promise((resolve) => message((error) => resolve(error)));
const results = Promise.all([
  delivered((done) => analytics.identify({ userId, traits: { email, firstName: 'Ada', plan: 'pro' } }, done)),
  delivered((done) =>
    analytics.track(
      { userId, event: 'Order Completed', properties: { order_id: randomUUID().slice(0, 8), revenue: 42.5, currency: 'EUR' } },
      done,
    ),
  ),
]);
await analytics.closeAndFlush(); // resolves once every queued message is sent
errors.push(...(await results).filter(Boolean));

if (errors.length > 0) {
  console.error('segment_ingest.mjs: delivery failed:', errors);
  process.exit(1);
}
console.log(`segment_ingest.mjs: sent identify and Order Completed for ${userId}`);
