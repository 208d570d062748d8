'use strict';
// The Node client against a real loramux server: every RPC, streaming, cancel mid-stream, a deadline, rich error
// details and grpc.health.v1. tests/polyglot/test_node_client.py starts the server (tiny test model, adapter
// LORAMUX_ADAPTER resident) and runs `node --test` with:
//   LORAMUX_TARGET           host:port of the server
//   LORAMUX_ADAPTER          an adapter loaded at start-up
//   LORAMUX_ADAPTER_SOURCE   a folder the server can load another adapter from
// The Python side then checks what the server saw (request ids, traceparent, cancelled rows freed).

const assert = require('node:assert/strict');
const { test } = require('node:test');
const { LoramuxClient, grpc, newTraceparent, richError, routingKey } = require('../src/loramux');

const { LORAMUX_TARGET: target, LORAMUX_ADAPTER: resident, LORAMUX_ADAPTER_SOURCE: source } = process.env;
if (!target || !resident || !source) {
  throw new Error('set LORAMUX_TARGET, LORAMUX_ADAPTER and LORAMUX_ADAPTER_SOURCE, or run this through ' +
    '`pytest tests/polyglot/test_node_client.py`, which starts a server and sets them');
}
const LOADED = 'node-loaded';
const PROMPT = 'Prove that the sum';
const TRACE_ID = '4bf92f3577b34da6a3ce929d0e0e4736'; // the Python side looks for it in the access log
const LONG = { text: PROMPT, stopping: { max_new_tokens: 2000, ignore_eos: true } };
const Status = grpc.status;

const client = new LoramuxClient(target);
test.after(() => client.close());

async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the call succeeded');
}

/** Read `after` messages of a stream, then cancel it; resolves to the error that ends the stream. */
function cancelAfter(stream, after) {
  return new Promise((resolve, reject) => {
    let seen = 0;
    stream.on('data', () => {
      seen += 1;
      if (seen === after) stream.cancel();
    });
    stream.on('error', resolve);
    stream.on('end', () => reject(new Error(`the stream ended after ${seen} messages without an error`)));
  });
}

test('health: the process and both services are SERVING, an unknown name is NOT_FOUND', async () => {
  assert.equal(await client.check(''), 'SERVING');
  assert.equal(await client.check('loramux.v1.AdapterService'), 'SERVING');
  assert.equal(await client.check('loramux.v1.GenerationService'), 'SERVING');
  const err = await rejection(client.check('no.such.Service'));
  assert.equal(err.code, Status.NOT_FOUND);
});

test('LoadAdapter loads a folder, and the same load again is a no-op', async () => {
  const { response, requestId } = await client.loadAdapter({ name: LOADED, source }, { requestId: 'node-load' });
  assert.equal(requestId, 'node-load');
  assert.equal(response.already_loaded, false);
  assert.equal(response.adapter.name, LOADED);
  assert.ok(response.adapter.rank > 0 && Number(response.adapter.size_bytes) > 0);
  const again = await client.loadAdapter({ name: LOADED, source });
  assert.equal(again.response.already_loaded, true);
  assert.match(again.requestId, /^[0-9a-f-]{36}$/); // none sent: the server made one up
});

test('ListAdapters pages through every adapter; GetAdapter returns one', async () => {
  const { adapters, defaultAdapter } = await client.listAllAdapters({ pageSize: 1 });
  const names = adapters.map((a) => a.name);
  assert.ok(names.includes(resident) && names.includes(LOADED), names.join(','));
  assert.deepEqual(names, [...names].sort());
  assert.equal(defaultAdapter, '');
  const { response } = await client.getAdapter({ name: resident });
  assert.equal(response.adapter.name, resident);
  assert.ok(response.adapter.target_modules.length > 0);
  assert.ok(response.adapter.loaded_at.seconds > 0); // a google.protobuf.Timestamp
});

test('SetAdapter makes an adapter the default, and Generate without `adapter` uses it', async () => {
  const { response } = await client.setAdapter({ name: LOADED });
  assert.equal(response.previous_default_adapter, '');
  assert.equal(response.adapter.is_default, true);
  const out = await client.generateText(
    { text: PROMPT, stopping: { max_new_tokens: 4, ignore_eos: true } },
    { requestId: 'node-default', traceparent: newTraceparent(TRACE_ID) },
  );
  assert.equal(out.requestId, 'node-default');
  assert.equal(out.finished.adapter, LOADED);
  await client.setAdapter({ name: '' }); // back to the bare base model
});

test('Generate streams token chunks, then exactly one finished event', async () => {
  const messages = [];
  for await (const message of client.generate({ ...LONG, adapter: resident, stopping: { max_new_tokens: 8, ignore_eos: true } })) {
    messages.push(message);
  }
  const last = messages.pop();
  assert.equal(last.event, 'finished');
  assert.ok(messages.every((m) => m.event === 'chunk'));
  const ids = messages.flatMap((m) => m.chunk.token_ids);
  assert.equal(ids.length, 8);
  const { finish_reason, usage, adapter, adapter_version } = last.finished;
  assert.equal(finish_reason, 'FINISH_REASON_LENGTH');
  assert.equal(usage.completion_tokens, 8);
  assert.ok(usage.prompt_tokens > 0);
  assert.equal(adapter, resident);
  assert.equal(adapter_version, 1);
  const base = await client.generateText({ text: PROMPT, adapter: '', stopping: { max_new_tokens: 8, ignore_eos: true } });
  assert.equal(base.finished.adapter, ''); // "" set: the bare base model
  assert.equal(base.tokenIds.length, 8);
});

test('Generate sends x-loramux-adapter, which must agree with the request; the reply names its replica', async () => {
  assert.equal(routingKey({ adapter: resident }), resident);
  assert.equal(routingKey({ adapter_mix: [{ name: LOADED, weight: 1 }], adapter: resident }), LOADED);
  assert.equal(routingKey({ adapter: '' }), '');
  assert.equal(routingKey({}), '');
  const out = await client.generateText({ text: PROMPT, adapter: resident, stopping: { max_new_tokens: 2 } });
  assert.equal(out.replica, target); // the server's default replica id: host:port as bound
  const err = await rejection(client.generateText(
    { text: PROMPT, adapter: resident }, { metadata: { 'x-loramux-adapter': 'another-adapter' } },
  ));
  assert.equal(err.code, Status.INVALID_ARGUMENT);
  const rich = richError(err);
  assert.equal(rich.errorInfo.reason, 'ADAPTER_METADATA_MISMATCH');
  assert.deepEqual(rich.badRequest.field_violations.map((v) => v.field), ['x-loramux-adapter']);
  assert.equal(err.metadata.get('x-loramux-replica')[0], target); // errors name the replica in the trailer
});

test('cancelling mid-stream ends the call with CANCELLED', async () => {
  const stream = client.generate({ ...LONG, adapter: resident }, { requestId: 'node-cancel' });
  const err = await cancelAfter(stream, 2);
  assert.equal(err.code, Status.CANCELLED);
});

test('a deadline that passes mid-stream ends the call with DEADLINE_EXCEEDED', async () => {
  const stream = client.generate(LONG, { requestId: 'node-deadline', deadlineMs: 300 });
  const err = await rejection((async () => {
    for await (const _ of stream); // eslint-disable-line no-unused-vars
  })());
  assert.equal(err.code, Status.DEADLINE_EXCEEDED);
});

test('NOT_FOUND carries a google.rpc.ErrorInfo with the reason, domain and request id', async () => {
  const err = await rejection(client.generateText({ text: PROMPT, adapter: 'no-such-adapter' }, { requestId: 'node-404' }));
  assert.equal(err.code, Status.NOT_FOUND);
  const rich = richError(err);
  assert.equal(rich.code, Status.NOT_FOUND);
  assert.equal(rich.message, err.details);
  assert.equal(rich.details.filter((d) => d.type === 'google.rpc.ErrorInfo').length, 1);
  assert.equal(rich.errorInfo.reason, 'ADAPTER_NOT_FOUND');
  assert.equal(rich.errorInfo.domain, 'loramux.dev');
  assert.equal(rich.errorInfo.metadata.adapter, 'no-such-adapter');
  assert.equal(rich.errorInfo.metadata.requestId, 'node-404');

  const unary = richError(await rejection(client.getAdapter({ name: 'no-such-adapter' })));
  assert.equal(unary.errorInfo.reason, 'ADAPTER_NOT_FOUND');
});

test('INVALID_ARGUMENT names the field in a google.rpc.BadRequest', async () => {
  const err = await rejection(client.listAdapters({ page_size: -1 }));
  assert.equal(err.code, Status.INVALID_ARGUMENT);
  const rich = richError(err);
  assert.equal(rich.errorInfo.reason, 'INVALID_ARGUMENT');
  assert.deepEqual(rich.badRequest.field_violations.map((v) => v.field), ['page_size']);
});

test('Tokenize counts the tokens Generate sees as the prompt, for text and for messages', async () => {
  const { response } = await client.tokenize({ text: PROMPT });
  assert.equal(response.count, response.token_ids.length);
  const done = await client.generateText({ text: PROMPT, adapter: '', stopping: { max_new_tokens: 1 } });
  assert.equal(done.finished.usage.prompt_tokens, response.count);
  const err = await rejection(client.tokenize({ messages: { messages: [{ role: 'user', content: 'hi' }] } }));
  assert.equal(err.code, Status.INVALID_ARGUMENT); // the tiny test tokenizer has no chat template
  assert.deepEqual(richError(err).badRequest.field_violations.map((v) => v.field), ['messages']);
});

test('logprobs with top alternatives, min_new_tokens and an adapter mix come through', async () => {
  const request = {
    text: PROMPT,
    adapter_mix: [{ name: resident, weight: 0.7 }, { name: LOADED, weight: 0.3 }],
    logprobs: true,
    top_logprobs: 3,
    stopping: { max_new_tokens: 6, min_new_tokens: 6 },
  };
  const { tokenIds, logprobs, finished } = await client.generateText(request);
  assert.equal(logprobs.length, tokenIds.length);
  assert.ok(logprobs.every((lp, i) => lp.token_id === tokenIds[i] && lp.logprob <= 0 && lp.top.length === 3));
  assert.equal(finished.usage.completion_tokens, 6);
  assert.deepEqual(finished.adapter_mix.map((m) => m.name), [resident, LOADED]);
  assert.equal(finished.adapter, '');
});

test('UnloadAdapter removes the adapter; allow_missing makes a repeat OK', async () => {
  const { response } = await client.unloadAdapter({ name: LOADED });
  assert.equal(response.adapter.name, LOADED);
  const err = await rejection(client.unloadAdapter({ name: LOADED }));
  assert.equal(err.code, Status.NOT_FOUND);
  await client.unloadAdapter({ name: LOADED, allow_missing: true });
  const { adapters } = await client.listAllAdapters();
  assert.ok(!adapters.some((a) => a.name === LOADED));
});
