// Sends a person and an order to the CDP with RudderStack's Node library.
//
// Run (Node 20 or later):
//   npm install @rudderstack/rudder-sdk-node@3.0.13
//   CDP_URL=http://127.0.0.1:8080 WRITE_KEY=cdp_wk_... node rudderstack_ingest.mjs
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
import Analytics from '@rudderstack/rudder-sdk-node';

const cdpUrl = process.env.CDP_URL ?? 'http://127.0.0.1:8080';
const writeKey = process.env.WRITE_KEY;
const userId = process.env.USER_ID ?? 'user-42';
const email = process.env.EMAIL ?? 'ada@example.com';
if (!writeKey) {
  console.error('rudderstack_ingest.mjs: set WRITE_KEY');
  process.exit(2);
}

const errors = [];
// The library posts gzip-compressed batches to {dataPlaneUrl}/v1/batch.
const client = new Analytics(writeKey, {
  dataPlaneUrl: cdpUrl,
  logLevel: 'error',
  errorHandler: (error) => errors.push(error.message),
});

// Each call's callback reports whether that message was delivered.
const delivered = (message) => new Promise((resolve) => message((error) => resolve(error)));
const results = Promise.all([
  delivered((done) => client.identify({ userId, traits: { email, firstName: 'Ada', plan: 'pro' } }, done)),
  delivered((done) =>
    client.track(
      { userId, event: 'Order Completed', properties: { order_id: randomUUID().slice(0, 8), revenue: 42.5, currency: 'EUR' } },
      done,
    ),
  ),
]);
await client.flush(); // sends what is queued
errors.push(...(await results).filter(Boolean));

if (errors.length > 0) {
  console.error('rudderstack_ingest.mjs: delivery failed:', errors);
  process.exit(1);
}
console.log(`rudderstack_ingest.mjs: sent identify and Order Completed for ${userId}`);
