// Queries the CDP with Apollo Client through automatic persisted queries sent by GET:
// the first request sends only the query's SHA-256; the server asks for the query once,
// then knows it by its hash, and GET answers may be cached by the browser (docs/api.md,
// "GET, persisted queries and compression").
//
// Run (Node 20 or later):
//   npm install @apollo/client@4.3.8 graphql@16.15.0 rxjs@7.8.2
//   CDP_URL=http://127.0.0.1:8080 CDP_TOKEN=... node apollo_persisted.mjs
//
// Environment:
//   CDP_URL    the server's base address (default http://127.0.0.1:8080)
//   CDP_TOKEN  an access token or a SECRET api key with PROFILES_READ
//
// Prints the tenant and the number of profiles, then the same again from a second,
// cache-free run of the query, which the server answers by hash alone.

import { createHash } from 'node:crypto';
import { ApolloClient, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { createPersistedQueryLink } from '@apollo/client/link/persisted-queries';

const cdpUrl = (process.env.CDP_URL ?? 'http://127.0.0.1:8080').replace(/\/$/, '');
const token = process.env.CDP_TOKEN;
if (!token) {
  console.error('apollo_persisted.mjs: set CDP_TOKEN');
  process.exit(2);
}

// Counts the requests and how they were sent, to show what APQ does on the wire.
const requests = [];
async function countingFetch(input, init) {
  const response = await fetch(input, init);
  const method = init?.method ?? 'GET';
  const withQuery = method === 'GET' ? /[?&]query=/.test(String(input)) : String(init?.body).includes('"query"');
  requests.push(`${method} ${response.status} ${withQuery ? 'with query' : 'hash only'}`);
  return response;
}

const sha256 = (query) => createHash('sha256').update(query).digest('hex');
const link = createPersistedQueryLink({ sha256, useGETForHashedQueries: true }).concat(
  new HttpLink({ uri: `${cdpUrl}/graphql`, headers: { authorization: `Bearer ${token}` }, fetch: countingFetch }),
);
const client = new ApolloClient({ link, cache: new InMemoryCache() });

const OVERVIEW = gql`
  query Overview {
    tenant { slug name }
    profiles(first: 1) { totalCount }
  }
`;

for (const run of ['first', 'second']) {
  const { data, error } = await client.query({ query: OVERVIEW, fetchPolicy: 'network-only' });
  if (error || !data) {
    console.error('apollo_persisted.mjs: query failed:', error?.message ?? 'no data');
    process.exit(1);
  }
  console.log(`apollo_persisted.mjs: ${run} run: tenant ${data.tenant.slug}, ${data.profiles.totalCount} profiles`);
}
console.log(`apollo_persisted.mjs: requests: ${requests.join(', ')}`);
// The second run must have been answered by hash alone.
if (requests.at(-1) !== 'GET 200 hash only') {
  console.error('apollo_persisted.mjs: the second run was not answered by its hash');
  process.exit(1);
}
