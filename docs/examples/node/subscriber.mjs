// Watches the CDP in real time over GraphQL subscriptions (graphql-ws, protocol
// graphql-transport-ws): prints one line per stored event and per segment entry or exit.
//
// Run (Node 20 or later; Node 22 has a WebSocket of its own, older ones use the ws package):
//   npm install graphql-ws@5.16.2 ws@8.23.0
//   CDP_URL=http://127.0.0.1:8080 CDP_TOKEN=... node subscriber.mjs
// Stop it with Ctrl-C.
//
// Environment:
//   CDP_URL     the server's base address (default http://127.0.0.1:8080); http becomes ws
//   CDP_TOKEN   an access token (from activateAccount or login; it lives 15 minutes) or a
//               SECRET api key (cdp_sk_..., does not expire); it needs PROFILES_READ
//   EVENT_NAME  only events of this name (default: every event)
//
// Output lines:
//   subscriber: connected to ws://.../graphql/ws
//   event track "Order Completed" profile=<id>
//   segment <segment id> entered profile=<id>

import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const cdpUrl = process.env.CDP_URL ?? 'http://127.0.0.1:8080';
const token = process.env.CDP_TOKEN;
if (!token) {
  console.error('subscriber.mjs: set CDP_TOKEN');
  process.exit(2);
}
const url = `${cdpUrl.replace(/^http/, 'ws').replace(/\/$/, '')}/graphql/ws`;

const client = createClient({
  url,
  webSocketImpl: globalThis.WebSocket ?? WebSocket,
  // Sent in connection_init; the server reads the tenant from it.
  connectionParams: { authorization: `Bearer ${token}` },
  on: { connected: () => console.log(`subscriber: connected to ${url}`) },
});

function watch(query, variables, print) {
  client.subscribe(
    { query, variables },
    {
      next: ({ data, errors }) => {
        if (errors) console.error('subscriber: error item:', JSON.stringify(errors));
        else print(data);
      },
      error: (error) => {
        console.error('subscriber: subscription failed:', error?.message ?? error?.reason ?? JSON.stringify(error));
        process.exit(1);
      },
      complete: () => {},
    },
  );
}

watch(
  'subscription($k: ID) { segmentMembershipChanged(segmentId: $k) { segmentId profileId entered at } }',
  { k: null },
  ({ segmentMembershipChanged: c }) =>
    console.log(`segment ${c.segmentId} ${c.entered ? 'entered' : 'left'} profile=${c.profileId}`),
);
watch(
  'subscription($name: String) { eventIngested(name: $name) { id profileId type name timestamp } }',
  { name: process.env.EVENT_NAME ?? null },
  ({ eventIngested: e }) => console.log(`event ${e.type}${e.name ? ` "${e.name}"` : ''} profile=${e.profileId}`),
);

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, async () => {
    await client.dispose();
    process.exit(0);
  });
}
