#!/usr/bin/env node
'use strict';
// Load an adapter, list the adapters, make one the default and stream a generation with it.
//
//   make run                                   # the demo server on 127.0.0.1:50051 (adapters upper, rot13, reverse)
//   npm ci --prefix clients/node               # once (make test does it too)
//   node clients/node/example.js --load shout=demo/assets/adapters/upper --prompt "def main"
//
// --load NAME=SOURCE loads SOURCE (a folder on the server's machine, relative to the server's working
// directory, or a Hub repo id) as NAME and makes it the default; without it, --adapter NAME (default: the
// first one listed) becomes the default.

const { parseArgs } = require('node:util');
const { LoramuxClient, newRequestId, richError } = require('./src/loramux');

const { values: args } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    load: { type: 'string' },
    adapter: { type: 'string' },
    prompt: { type: 'string', default: 'The quick brown fox' },
    'max-new-tokens': { type: 'string', default: '32' },
  },
});

async function main() {
  const client = new LoramuxClient(args.target);
  try {
    console.log(`health: ${await client.check('loramux.v1.GenerationService')}`);
    let chosen = args.adapter;
    if (args.load) {
      const [name, source] = args.load.split(/=(.*)/s);
      const { response } = await client.loadAdapter({ name, source }, { deadlineMs: 300_000 });
      console.log(`loaded ${response.adapter.name} (rank ${response.adapter.rank}, ${response.adapter.size_bytes} bytes)` +
        (response.already_loaded ? ', already loaded' : ''));
      chosen = name;
    }
    const { adapters, defaultAdapter } = await client.listAllAdapters();
    for (const a of adapters) console.log(`adapter ${a.name}: rank ${a.rank}, targets ${a.target_modules.join(',')}`);
    console.log(`default was: ${defaultAdapter || '(base model)'}`);
    chosen = chosen ?? (adapters.length > 0 ? adapters[0].name : '');
    await client.setAdapter({ name: chosen });
    console.log(`default is now: ${chosen || '(base model)'}`);

    const request = { text: args.prompt, stopping: { max_new_tokens: Number(args['max-new-tokens']) } };
    const requestId = newRequestId(); // sent as x-request-id: the server logs it and echoes it back
    console.log(`request id: ${requestId}`);
    const stream = client.generate(request, { requestId }); // `adapter` unset: the default adapter
    process.stdout.write(`> ${args.prompt}`);
    for await (const message of stream) {
      if (message.event === 'chunk') {
        process.stdout.write(message.chunk.text);
      } else {
        const { finish_reason, usage, adapter } = message.finished;
        console.log(`\nfinished: ${finish_reason}, adapter ${adapter || '(base model)'},` +
          ` ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
      }
    }
  } catch (err) {
    const rich = richError(err);
    console.error(`error: ${err.code} ${err.details}` + (rich && rich.errorInfo ? ` (${rich.errorInfo.reason})` : ''));
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
