// Sends a customer journey through the real Node client libraries, configured the way their
// documentation says, and appends what each sent to a manifest for verify.py.
//
// Usage: node send.mjs BASE_URL SEGMENT_WRITE_KEY RUDDER_WRITE_KEY MANIFEST
//
//   @segment/analytics-node: new Analytics({ writeKey, host }); it posts to {host}/v1/batch
//       with HTTP Basic auth; closeAndFlush() resolves once every message is delivered.
//   @rudderstack/rudder-sdk-node: new Analytics(writeKey, { dataPlaneUrl }); it posts
//       gzip-compressed batches to {dataPlaneUrl}/v1/batch; flush() returns a promise.
//
// The libraries are installed in ./node (tests/clients/node/node_modules) by run.sh.
// Each library: an anonymous track, identify (email with mixed case and spaces, a UK phone
// with spaces), track with properties, page, screen, group, alias (anonymous id -> user id).
// Every call's callback must report success, else the script fails.

import { randomUUID } from 'node:crypto';
import { appendFileSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const here = new URL('./node/', import.meta.url);
const require = createRequire(here);

function versionOf(name) {
  const file = new URL(`node_modules/${name}/package.json`, here);
  return JSON.parse(readFileSync(file, 'utf8')).version;
}

function journey(prefix, phoneSuffix) {
  const run = randomUUID().slice(0, 8);
  const local = prefix.replaceAll('-', '.');
  return {
    userId: `${prefix}-user-${run}`,
    anonymousId: `${prefix}-anon-${run}`,
    rawEmail: `  Ada.Lovelace+${local}@Example.COM `,
    email: `ada.lovelace+${local}@example.com`,
    rawPhone: `+44 20 7946 ${phoneSuffix}`,
    phone: `+44207946${phoneSuffix}`,
    event: 'Order Completed',
    properties: {
      order_id: `order-${run}`,
      revenue: 42.5,
      currency: 'EUR',
      products: [{ sku: 'sku-1', quantity: 2 }],
    },
    groupId: `${prefix}-group-${run}`,
  };
}

// The calls both libraries share: each takes (message, callback).
function calls(j) {
  const traits = { email: j.rawEmail, phone: j.rawPhone, name: 'Ada Lovelace', plan: 'pro' };
  return [
    ['track', { anonymousId: j.anonymousId, event: 'Product Viewed', properties: { sku: 'sku-1' } }],
    ['identify', { userId: j.userId, traits }],
    ['track', { userId: j.userId, event: j.event, properties: j.properties }],
    ['page', { userId: j.userId, category: 'Docs', name: 'Pricing', properties: { path: '/pricing' } }],
    ['screen', { userId: j.userId, name: 'Checkout', properties: { step: 2 } }],
    ['group', { userId: j.userId, groupId: j.groupId, traits: { name: 'Analytical Engines Ltd', employees: 12 } }],
    ['alias', { userId: j.userId, previousId: j.anonymousId }],
  ];
}

// Calls each method with a callback; resolves to the list of delivery errors.
function sendAll(client, j) {
  const delivered = calls(j).map(
    ([method, message]) =>
      new Promise((resolve) => {
        client[method](message, (error) => resolve(error ? `${method}: ${error.message ?? error}` : null));
      }),
  );
  return { types: calls(j).map(([method]) => method), delivered: Promise.all(delivered) };
}

async function segmentNode(url, writeKey, j) {
  const { Analytics } = require('@segment/analytics-node');
  const analytics = new Analytics({ writeKey, host: url, maxRetries: 1 });
  const errors = [];
  analytics.on('error', (error) => errors.push(`error event: ${error.code} ${error.reason ?? ''}`));
  const { types, delivered } = sendAll(analytics, j);
  await analytics.closeAndFlush({ timeout: 30000 });
  errors.push(...(await delivered).filter(Boolean));
  return { errors, types };
}

async function rudderNode(url, writeKey, j) {
  const Analytics = require('@rudderstack/rudder-sdk-node');
  const errors = [];
  const client = new Analytics(writeKey, {
    dataPlaneUrl: url,
    retryCount: 1,
    logLevel: 'error',
    errorHandler: (error) => errors.push(`errorHandler: ${error.message}`),
  });
  const { types, delivered } = sendAll(client, j);
  await client.flush();
  errors.push(...(await delivered).filter(Boolean));
  return { errors, types };
}

const LIBRARIES = [
  // [package, api key name, phone suffix, sender]
  ['@segment/analytics-node', 'segment-node', '0960', segmentNode],
  ['@rudderstack/rudder-sdk-node', 'rudder-node', '0961', rudderNode],
];

async function main(argv) {
  if (argv.length !== 4) {
    console.error('usage: node send.mjs BASE_URL SEGMENT_WRITE_KEY RUDDER_WRITE_KEY MANIFEST');
    return 2;
  }
  const [url, segmentKey, rudderKey, manifest] = argv;
  const keys = { 'segment-node': segmentKey, 'rudder-node': rudderKey };
  let failed = 0;
  for (const [name, source, phoneSuffix, sender] of LIBRARIES) {
    const library = `${name} ${versionOf(name)}`;
    const j = journey(source, phoneSuffix);
    const { errors, types } = await sender(url, keys[source], j);
    if (errors.length > 0) {
      failed += 1;
      console.error(`FAIL ${library}: delivery errors: ${errors.join('; ')}`);
      continue;
    }
    console.log(`sent ${library}: ${types.length} messages as ${j.userId}`);
    appendFileSync(manifest, JSON.stringify({ ...j, library, source, types }) + '\n');
  }
  return failed ? 1 : 0;
}

process.exit(await main(process.argv.slice(2)));
