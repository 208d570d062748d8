'use strict';
// A small Node.js client of the loramux gRPC API (loramux.v1) on @grpc/grpc-js and @grpc/proto-loader.
//
// The contract is read at run time from the repository's .proto files (../../../protos), so this client
// never goes stale against the server's. Two standard pieces come from ../third_party (verbatim upstream
// copies): grpc.health.v1 (health.proto) and google.rpc.Status with its error details, decoded with
// protobufjs from the `grpc-status-details-bin` trailer (see `richError`).
//
//   const { LoramuxClient } = require('./src/loramux');
//   const client = new LoramuxClient('127.0.0.1:50051');
//   const { response } = await client.listAdapters({});
//   for await (const event of client.generate({ text: 'Hello', adapter: 'math' })) { ... }
//   client.close();
//
// Messages use the .proto field names (keepCase): `{ text, adapter, stopping: { max_new_tokens } }`.
// 64-bit integers are strings and enums are their names ('FINISH_REASON_LENGTH'); a response's oneof
// case is in a virtual field named after the oneof (`event.event === 'chunk'`).

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos');
const THIRD_PARTY = path.resolve(__dirname, '..', 'third_party');
const FILES = ['loramux/v1/adapter_service.proto', 'loramux/v1/generation_service.proto', 'grpc/health/v1/health.proto'];
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS, THIRD_PARTY],
};
const DEFAULT_DEADLINE_MS = 30_000;
const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
const ADAPTER_KEY = 'x-loramux-adapter'; // the routing key of an adapter-hashing load balancer
const REPLICA_KEY = 'x-loramux-replica'; // which replica served a call

let cachedPackage = null;
let cachedStatusRoot = null;

/** The loaded gRPC package object: `.loramux.v1.AdapterService`, `.grpc.health.v1.Health`, ... */
function loadPackage() {
  if (cachedPackage === null) {
    cachedPackage = grpc.loadPackageDefinition(protoLoader.loadSync(FILES, LOADER_OPTIONS));
  }
  return cachedPackage;
}

function statusRoot() {
  if (cachedStatusRoot === null) {
    const root = new protobuf.Root();
    // google/protobuf/*.proto (Any, Duration) are bundled with protobufjs; the rest is in third_party/.
    root.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(THIRD_PARTY, target));
    root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
    cachedStatusRoot = root;
  }
  return cachedStatusRoot;
}

/** A new request id (sent as `x-request-id`; the server echoes the one in effect). */
function newRequestId() {
  return crypto.randomUUID();
}

/** A W3C `traceparent` value for a new trace (or for `traceId`), sampled. */
function newTraceparent(traceId = crypto.randomBytes(16).toString('hex')) {
  return `00-${traceId}-${crypto.randomBytes(8).toString('hex')}-01`;
}

/**
 * The google.rpc.Status details of a failed call, decoded: `{ code, message, details, errorInfo, badRequest,
 * preconditionFailure, retryInfo }`, where `details` lists every detail as `{ type, ...fields }` and the named
 * ones are the first detail of that type (or undefined). Returns null when the error carries no details (the
 * grpc library's own CANCELLED, DEADLINE_EXCEEDED, ...).
 */
function richError(err) {
  const raw = err && err.metadata ? err.metadata.get(STATUS_DETAILS_KEY) : [];
  if (!raw || raw.length === 0) {
    return null;
  }
  const root = statusRoot();
  const status = root.lookupType('google.rpc.Status').decode(raw[0]);
  const details = status.details.map((any) => {
    const type = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const message = root.lookupType(type);
    return { type, ...message.toObject(message.decode(any.value), { longs: String, enums: String, defaults: true }) };
  });
  const first = (type) => details.find((d) => d.type === type);
  return {
    code: status.code,
    message: status.message,
    details,
    errorInfo: first('google.rpc.ErrorInfo'),
    badRequest: first('google.rpc.BadRequest'),
    preconditionFailure: first('google.rpc.PreconditionFailure'),
    retryInfo: first('google.rpc.RetryInfo'),
  };
}

/**
 * Call options: `deadlineMs` (default 30 s), `requestId`, `traceparent`, `metadata` ({ key: value }). `token` (set
 * by the client from its constructor option) becomes `authorization: Bearer <token>`.
 */
function callMetadata({ requestId, traceparent, metadata, token } = {}) {
  const md = new grpc.Metadata();
  if (token) md.set('authorization', `Bearer ${token}`);
  if (requestId) md.set('x-request-id', requestId);
  if (traceparent) md.set('traceparent', traceparent);
  for (const [key, value] of Object.entries(metadata || {})) md.set(key, value);
  return md;
}

/**
 * The routing key of a Generate (`x-loramux-adapter`): the adapter it names or its mix's first member. None for the
 * bare base model ('') and the server's default (unset): a load balancer sends those to its base-model backend. The
 * server checks that the key agrees with the request (INVALID_ARGUMENT ADAPTER_METADATA_MISMATCH otherwise).
 */
function routingKey(request) {
  const mix = request.adapter_mix || [];
  return mix.length > 0 ? mix[0].name : request.adapter || '';
}

function deadline({ deadlineMs = DEFAULT_DEADLINE_MS } = {}) {
  return { deadline: new Date(Date.now() + deadlineMs) };
}

class LoramuxClient {
  /**
   * `target`: host:port. `options.credentials`: grpc-js channel credentials (default: plaintext; for TLS
   * `grpc.credentials.createSsl(caPem)`). `options.token`: a bearer token sent on every call, for servers
   * started with --auth-tokens-file.
   */
  constructor(target, { credentials = grpc.credentials.createInsecure(), channelOptions = {}, token } = {}) {
    this.token = token;
    const pkg = loadPackage();
    this.adapters = new pkg.loramux.v1.AdapterService(target, credentials, channelOptions);
    const shared = { ...channelOptions, channelOverride: this.adapters.getChannel() }; // one connection for all
    this.generation = new pkg.loramux.v1.GenerationService(target, credentials, shared);
    this.health = new pkg.grpc.health.v1.Health(target, credentials, shared);
  }

  /** Resolves to `{ response, requestId }` (the `x-request-id` the server echoed); rejects with the grpc error. */
  unary(client, method, request, options = {}) {
    return new Promise((resolve, reject) => {
      let requestId;
      const md = callMetadata({ ...options, token: this.token });
      const call = client[method](request, md, deadline(options), (err, response) => {
        if (err) reject(err);
        else resolve({ response, requestId });
      });
      call.on('metadata', (md) => {
        requestId = md.get('x-request-id')[0];
      });
    });
  }

  loadAdapter(request, options) {
    return this.unary(this.adapters, 'LoadAdapter', request, options);
  }

  unloadAdapter(request, options) {
    return this.unary(this.adapters, 'UnloadAdapter', request, options);
  }

  setAdapter(request, options) {
    return this.unary(this.adapters, 'SetAdapter', request, options);
  }

  getAdapter(request, options) {
    return this.unary(this.adapters, 'GetAdapter', request, options);
  }

  listAdapters(request, options) {
    return this.unary(this.adapters, 'ListAdapters', request, options);
  }

  /** Every loaded adapter, following next_page_token: `{ adapters, defaultAdapter }`. */
  async listAllAdapters({ pageSize = 100, ...options } = {}) {
    const adapters = [];
    let pageToken = '';
    let defaultAdapter = '';
    do {
      const { response } = await this.listAdapters({ page_size: pageSize, page_token: pageToken }, options);
      adapters.push(...response.adapters);
      defaultAdapter = response.default_adapter;
      pageToken = response.next_page_token;
    } while (pageToken);
    return { adapters, defaultAdapter };
  }

  /**
   * Generate: the grpc-js stream (an async iterable of GenerateResponse; `.cancel()` stops the generation on the
   * server; the 'metadata' event carries the echoed `x-request-id` and `x-loramux-replica`, the replica that serves
   * it). Sends `x-loramux-adapter` (see routingKey); `options.metadata` may override it.
   */
  generate(request, options = {}) {
    const key = routingKey(request);
    const metadata = { ...(key ? { [ADAPTER_KEY]: key } : {}), ...(options.metadata || {}) };
    const md = callMetadata({ ...options, metadata, token: this.token });
    return this.generation.Generate(request, md, deadline(options));
  }

  /**
   * Generate, collected: `{ text, tokenIds, logprobs, finished, requestId, replica }` (logprobs: with
   * `logprobs: true`; replica: `x-loramux-replica`).
   */
  async generateText(request, options = {}) {
    const stream = this.generate(request, options);
    let requestId;
    let replica;
    stream.on('metadata', (md) => {
      requestId = md.get('x-request-id')[0];
      replica = md.get(REPLICA_KEY)[0];
    });
    let text = '';
    const tokenIds = [];
    const logprobs = [];
    let finished = null;
    for await (const message of stream) {
      if (message.event === 'chunk') {
        text += message.chunk.text;
        tokenIds.push(...message.chunk.token_ids);
        logprobs.push(...message.chunk.logprobs);
      } else if (message.event === 'finished') {
        finished = message.finished;
      }
    }
    return { text, tokenIds, logprobs, finished, requestId, replica };
  }

  /** Tokenize: `{ response: { token_ids, count }, requestId }`, the ids Generate would see for this input. */
  tokenize(request, options) {
    return this.unary(this.generation, 'Tokenize', request, options);
  }

  /** grpc.health.v1 Check: resolves to 'SERVING', 'NOT_SERVING', ...; rejects (NOT_FOUND) for unknown names. */
  async check(service = '', options = {}) {
    const { response } = await this.unary(this.health, 'Check', { service }, { deadlineMs: 5_000, ...options });
    return response.status;
  }

  close() {
    this.adapters.close(); // the channel is shared: closing one client closes it for all three
  }
}

module.exports = { LoramuxClient, grpc, loadPackage, newRequestId, newTraceparent, richError, routingKey };
