#!/usr/bin/env node
// Score a small batch with the fipo reward server from Node.js, then stream a few items.
//
//   node score.js [host:port]          (default 127.0.0.1:50051)
//
// Environment: FIPO_REWARD_TOKEN (bearer token, if the server needs one);
// FIPO_TLS_CA / FIPO_TLS_CERT / FIPO_TLS_KEY (PEM paths, for TLS / mTLS).
// Prints one JSON object per line: {"rpc": ..., ...}; exits 1 on any RPC error.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync('fipo/v1/reward.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names exactly as in the .proto (snake_case)
  enums: String, // enum values as their names, e.g. "STATUS_OK"
  longs: Number,
  defaults: true,
});
const fipo = grpc.loadPackageDefinition(definition).fipo.v1;

function credentials() {
  const { FIPO_TLS_CA: ca, FIPO_TLS_CERT: cert, FIPO_TLS_KEY: key } = process.env;
  if (!ca) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(
    fs.readFileSync(ca),
    key ? fs.readFileSync(key) : null,
    cert ? fs.readFileSync(cert) : null,
  );
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.FIPO_REWARD_TOKEN) md.set('authorization', `Bearer ${process.env.FIPO_REWARD_TOKEN}`);
  return md;
}

const ITEMS = [
  { id: 'right', response: 'So the answer is \\boxed{\\frac{1}{2}}.', golds: ['0.5'] },
  { id: 'wrong', response: 'I get \\boxed{3}.', golds: ['4'], reward_scheme: 'REWARD_SCHEME_SIGNED' },
  { id: 'choice', response: 'The answer is (B).', golds: ['B'], answer_format: 'ANSWER_FORMAT_CHOICE' },
  { id: 'none', response: 'No idea.', golds: ['7'] },
  { id: 'tower', response: '\\boxed{2^{2^{2^{2^{2}}}}}', golds: ['1'] },
  { id: 'long', response: 'ok \\boxed{5}', golds: ['5'], response_tokens: 95, max_response_tokens: 100, overlong_buffer: 10 },
];

function print(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const address = process.argv[2] || '127.0.0.1:50051';
  const client = new fipo.RewardService(address, credentials());
  const deadline = () => new Date(Date.now() + 30000);

  const info = await new Promise((resolve, reject) =>
    client.GetServerInfo({}, metadata(), { deadline: deadline() }, (err, res) => (err ? reject(err) : resolve(res))),
  );
  print({ rpc: 'GetServerInfo', workers: info.workers, math_verify: info.math_verify_version });

  const scored = await new Promise((resolve, reject) =>
    client.Score({ items: ITEMS }, metadata(), { deadline: deadline() }, (err, res) => (err ? reject(err) : resolve(res))),
  );
  for (const r of scored.results) {
    print({ rpc: 'Score', id: r.id, status: r.status, reward: r.reward, prediction: r.extracted_prediction, message: r.message });
  }

  // Bidirectional streaming: send items one by one; results arrive as each finishes.
  const streamed = await new Promise((resolve, reject) => {
    const out = [];
    const call = client.ScoreStream(metadata(), { deadline: deadline() });
    call.on('data', (r) => out.push(r));
    call.on('error', reject);
    call.on('end', () => resolve(out));
    for (const item of ITEMS.slice(0, 3)) call.write({ ...item, id: `stream-${item.id}` });
    call.end();
  });
  for (const r of streamed) print({ rpc: 'ScoreStream', id: r.id, status: r.status, reward: r.reward });
  client.close();
}

main().catch((err) => {
  print({ error: err.code, details: err.details || String(err) });
  process.exit(1);
});
