// graphile-worker's side of bench/bench_peers.py.
//
//   node bench/graphile_peer.cjs load N     run the migrations, then add N jobs in one addJobs call
//   node bench/graphile_peer.cjs worker C   a worker (concurrency C, a task that does nothing)
//
// The connection string is DATABASE_URL; the graphile-worker package is required from the
// node_modules directory GRAPHILE_WORKER_NODE_MODULES (the benchmark installs a pinned version
// there). The worker loads everything, prints "ready", waits for "go" on stdin, runs, and on
// "stop" stops and prints one JSON line: {"calls": n, "last_call_ns": ...}, the time of the
// last task call from process.hrtime (CLOCK_MONOTONIC on Linux, like Python's
// time.monotonic()).
"use strict";

const path = require("path");
const readline = require("readline");

const gw = require(path.join(process.env.GRAPHILE_WORKER_NODE_MODULES, "graphile-worker"));
const connectionString = process.env.DATABASE_URL;

async function load(n) {
  await gw.runMigrations({ connectionString, logger: quietLogger() });
  const utils = await gw.makeWorkerUtils({ connectionString, logger: quietLogger() });
  try {
    const specs = [];
    for (let i = 0; i < n; i++) specs.push({ identifier: "noop", payload: { i } });
    await utils.addJobs(specs);
  } finally {
    await utils.release();
  }
  process.stdout.write(JSON.stringify({ added: n }) + "\n");
}

function quietLogger() {
  return new gw.Logger(() => (level, message) => {
    if (level === "error") process.stderr.write(`graphile-worker: ${message}\n`);
  });
}

async function worker(concurrency) {
  let calls = 0;
  let lastCallNs = 0n;
  const lines = readline.createInterface({ input: process.stdin });
  const next = () => new Promise((resolve) => lines.once("line", resolve));
  process.stdout.write("ready\n");
  await next(); // "go"
  const runner = await gw.run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    logger: quietLogger(),
    taskList: {
      noop: async () => {
        calls += 1;
        lastCallNs = process.hrtime.bigint();
      },
    },
  });
  await next(); // "stop"
  await runner.stop();
  process.stdout.write(JSON.stringify({ calls, last_call_ns: lastCallNs.toString() }) + "\n");
  lines.close();
}

const [mode, arg] = process.argv.slice(2);
const main = mode === "load" ? load(Number(arg)) : worker(Number(arg));
main.catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
