#!/usr/bin/env node
// Compatibility checks: the real @fal-ai/client (pinned to 1.10.1) against a running flux2-lora-server.
//
//   FAL_SERVER_URL=http://127.0.0.1:8123 node tests/js/fal_client_compat.mjs <scenario>
//
// scenario: subscribe | stream | queue | run | validation | cancel | proxy | all
// On success prints exactly one JSON line on stdout and exits 0; on any mismatch prints
// "FAIL <scenario>[<mode>]: <why>" (plus the recent wire calls) on stderr and exits 1.
//
// Direct mode points the client's hard-coded https://fal.run and https://queue.fal.run URLs at the
// server with a requestMiddleware; proxy mode uses the client's own proxy support
// (proxyUrl: {url, when: "always"}), so every call goes to /api/fal/proxy with x-fal-target-url.
// The only other thing configured is a `fetch` that records each call (the client's `fetch` option),
// so the checks can also assert what went over the wire.
//
// Optional env: FAL_ENDPOINT (default fal-ai/flux-2/lora), FAL_TEST_TIMEOUT_S (default 600),
// FAL_CANCEL_BLOCKERS (requests submitted ahead of the one cancelled, default 1; doubled on
// each retry when the server gets through them before the cancel arrives),
// FAL_CANCEL_BLOCKER_STEPS (their num_inference_steps, default 50), FAL_TEST_VERBOSE=1 (log every call).

import { fal, ApiError, ValidationError } from "@fal-ai/client";

const SCENARIOS = ["subscribe", "stream", "queue", "run", "validation", "cancel", "upload"];
const USAGE = `usage: FAL_SERVER_URL=http://HOST:PORT node tests/js/fal_client_compat.mjs <${[...SCENARIOS, "proxy", "all"].join("|")}>`;

const scenario = process.argv[2];
const BASE = (process.env.FAL_SERVER_URL || "").replace(/\/+$/, "");
if (!scenario || ![...SCENARIOS, "proxy", "all"].includes(scenario) || !/^https?:\/\/[^/]+/.test(BASE)) {
  console.error(USAGE);
  process.exit(2);
}
const ENDPOINT = process.env.FAL_ENDPOINT || "fal-ai/flux-2/lora";
const APP = ENDPOINT.split("/").slice(0, 2).join("/"); // owner/alias: what status/result/cancel use
const PROXY_URL = `${BASE}/api/fal/proxy`;
const TIMEOUT_S = Number(process.env.FAL_TEST_TIMEOUT_S || 600);
const CANCEL_BLOCKERS = Number(process.env.FAL_CANCEL_BLOCKERS || 1);
const CANCEL_BLOCKER_STEPS = Number(process.env.FAL_CANCEL_BLOCKER_STEPS || 50);
const CANCEL_ATTEMPTS = 6; // requests ahead double on each attempt: 1, 2, 4, 8, 16, 32 by default
const VERBOSE = process.env.FAL_TEST_VERBOSE === "1";

const INPUT = { prompt: "a red fox in fresh snow, photograph", image_size: "square", num_inference_steps: 4, seed: 7 };
const BAD_INPUT = { ...INPUT, num_inference_steps: 1000 };
const STATUSES = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"];
const FAL_RUN = "https://fal.run/";
const FAL_QUEUE = "https://queue.fal.run/";
const FAL_REST = "https://rest.fal.ai/"; // fal.storage.upload's calls
const EDIT_ENDPOINT = "fal-ai/flux-2/edit";

// ---------------------------------------------------------------------------------------------
// Wire recording: the client's `fetch` option, wrapped so each call can be checked afterwards.

const wire = [];

function flattenHeaders(headers) {
  // The client passes a plain object, sometimes with the same name in two cases ("Accept" and
  // "accept"); undici joins those with ", " exactly like this.
  const out = {};
  const entries = headers instanceof Headers ? [...headers.entries()] : Object.entries(headers || {});
  for (const [k, v] of entries) {
    const key = k.toLowerCase();
    out[key] = key in out ? `${out[key]}, ${v}` : String(v);
  }
  return out;
}

async function recordingFetch(url, init = {}) {
  const entry = { method: (init.method || "GET").toUpperCase(), url: String(url), headers: flattenHeaders(init.headers) };
  wire.push(entry);
  const response = await fetch(url, init);
  entry.status = response.status;
  entry.contentType = response.headers.get("content-type");
  entry.requestId = response.headers.get("x-fal-request-id");
  if (VERBOSE) console.error(`[wire] ${entry.method} ${entry.url} ${logicalUrl(entry)} -> ${entry.status}`);
  return response;
}

/** The fal URL the client meant (https://fal.run/... or https://queue.fal.run/...), in either mode. */
function logicalUrl(entry) {
  if (entry.headers["x-fal-target-url"]) return entry.headers["x-fal-target-url"];
  if (entry.url.startsWith(`${BASE}/queue/`)) return FAL_QUEUE + entry.url.slice(`${BASE}/queue/`.length);
  if (entry.url.startsWith(`${BASE}/`)) return FAL_RUN + entry.url.slice(`${BASE}/`.length);
  return entry.url;
}

function rewriteToServer(url) {
  if (url.startsWith(FAL_QUEUE)) return `${BASE}/queue/${url.slice(FAL_QUEUE.length)}`;
  if (url.startsWith(FAL_RUN)) return `${BASE}/${url.slice(FAL_RUN.length)}`;
  if (url.startsWith(FAL_REST)) return `${BASE}/${url.slice(FAL_REST.length)}`;
  throw new Error(`client built an unexpected URL (not fal.run / queue.fal.run): ${url}`);
}

function configureClient(mode) {
  if (mode === "proxy") {
    // In Node the proxy is only used with when: "always" (a plain string proxies in browsers only).
    fal.config({ credentials: "test-key", fetch: recordingFetch, proxyUrl: { url: PROXY_URL, when: "always" } });
  } else {
    fal.config({
      credentials: "test-key",
      fetch: recordingFetch,
      requestMiddleware: async (request) => ({ ...request, url: rewriteToServer(request.url) }),
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Checks

class Mismatch extends Error {}

function check(condition, message) {
  if (!condition) throw new Mismatch(message);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const short = (value) => JSON.stringify(value)?.slice(0, 400);

/** Every call of a scenario went where the mode says, with the credentials the client was given. */
function checkWire(calls, mode) {
  check(calls.length > 0, "the client made no HTTP calls at all");
  for (const c of calls) {
    const where = `${c.method} ${c.url}`;
    if (c.method === "PUT" && c.url.startsWith(`${BASE}/storage/upload/`)) {
      // An upload's bytes go straight to the upload URL the server gave, with no key: the URL is the
      // authority (the client sends none there, on fal too).
      check(!c.headers.authorization, `${where}: the client sent its key to the upload URL`);
      check(c.status === 200, `${where}: the upload PUT answered HTTP ${c.status}`);
      continue;
    }
    check(c.headers.authorization === "Key test-key", `${where}: Authorization header was ${short(c.headers.authorization)}, expected "Key test-key"`);
    if (mode === "proxy") {
      check(c.url === PROXY_URL, `${where}: proxy mode must send every call to ${PROXY_URL}`);
      const target = c.headers["x-fal-target-url"];
      check(typeof target === "string" && [FAL_RUN, FAL_QUEUE, FAL_REST].some((host) => target.startsWith(host)),
        `${where}: x-fal-target-url header missing or not a fal URL: ${short(target)}`);
    } else {
      check(c.url.startsWith(`${BASE}/`), `${where}: direct mode call did not go to ${BASE}`);
      check(!("x-fal-target-url" in c.headers), `${where}: unexpected x-fal-target-url in direct mode`);
    }
    check(typeof c.status === "number", `${where}: no HTTP response (connection failed?)`);
  }
}

function callsMatching(calls, method, regex) {
  return calls.filter((c) => c.method === method && regex.test(logicalUrl(c)));
}

const esc = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const RE = {
  submit: new RegExp(`^${esc(FAL_QUEUE + ENDPOINT)}$`),
  run: new RegExp(`^${esc(FAL_RUN + ENDPOINT)}$`),
  status: new RegExp(`^${esc(FAL_QUEUE + APP)}/requests/[^/?]+/status\\?logs=[01]$`),
  stream: new RegExp(`^${esc(FAL_QUEUE + APP)}/requests/[^/?]+/status/stream\\?logs=[01]$`),
  result: new RegExp(`^${esc(FAL_QUEUE + APP)}/requests/[^/?]+$`),
  cancel: new RegExp(`^${esc(FAL_QUEUE + APP)}/requests/[^/?]+/cancel$`),
};

/** The HTTP code of status answers: 202 before completion, 200 once COMPLETED. */
function checkStatusCodes(calls, statuses) {
  // `statuses` pairs with the status calls in order (what the client returned for each).
  const statusCalls = callsMatching(calls, "GET", RE.status);
  check(statusCalls.length === statuses.length, `expected ${statuses.length} status calls on the wire, saw ${statusCalls.length}`);
  statusCalls.forEach((c, i) => {
    const expected = statuses[i] === "COMPLETED" ? 200 : 202;
    check(c.status === expected, `status call answered HTTP ${c.status} with status ${statuses[i]}; expected ${expected}`);
    check(c.requestId, `status call ${logicalUrl(c)} answered without an x-fal-request-id header`);
  });
}

async function checkImages(data, where) {
  check(data && typeof data === "object", `${where}: output is not a JSON object: ${short(data)}`);
  check(Array.isArray(data.images) && data.images.length >= 1, `${where}: output has no images: ${short(data)}`);
  const img = data.images[0];
  check(typeof img.url === "string" && img.url.length > 0, `${where}: images[0].url missing: ${short(img)}`);
  check(img.width === 512 && img.height === 512, `${where}: images[0] is ${img.width}x${img.height}, image_size "square" is 512x512`);
  check(typeof img.content_type === "string" && img.content_type.startsWith("image/"), `${where}: images[0].content_type is ${short(img.content_type)}`);
  check(data.seed === INPUT.seed, `${where}: output seed is ${short(data.seed)}, requested ${INPUT.seed}`);
  if (!img.url.startsWith("data:")) {
    // A real user downloads the image next: the URL must be absolute and served.
    let response;
    try {
      response = await fetch(img.url);
    } catch (error) {
      throw new Mismatch(`${where}: could not download images[0].url ${img.url}: ${error.message}`);
    }
    check(response.ok, `${where}: GET ${img.url} answered HTTP ${response.status}`);
    const type = response.headers.get("content-type") || "";
    check(type.startsWith("image/"), `${where}: GET ${img.url} has content-type ${short(type)}`);
    const bytes = (await response.arrayBuffer()).byteLength;
    check(bytes > 0, `${where}: GET ${img.url} returned an empty body`);
  }
  return { url: img.url.slice(0, 120), width: img.width, height: img.height, content_type: img.content_type };
}

function checkValidationError(error, where) {
  check(error !== undefined, `${where}: an invalid input (num_inference_steps: 1000) did not throw`);
  if (!(error instanceof ValidationError)) {
    const detail = error instanceof ApiError ? `ApiError status ${error.status} body ${short(error.body)}` : String(error?.stack || error);
    throw new Mismatch(`${where}: expected the client's ValidationError, got ${detail}`);
  }
  check(error.status === 422, `${where}: ValidationError with status ${error.status}`);
  const fieldErrors = error.getFieldErrors("num_inference_steps");
  check(fieldErrors.length >= 1, `${where}: no field error names num_inference_steps: ${short(error.body)}`);
  for (const fe of fieldErrors) {
    check(Array.isArray(fe.loc) && fe.loc[0] === "body", `${where}: field error loc should start with "body": ${short(fe)}`);
    check(typeof fe.msg === "string" && typeof fe.type === "string", `${where}: field error lacks msg/type: ${short(fe)}`);
  }
  return { class: error.constructor.name, status: error.status, field_errors: fieldErrors.map((fe) => ({ loc: fe.loc, type: fe.type })) };
}

async function expectThrow(promise) {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Scenarios. Each gets the calls it made (recorded) and returns a small summary.

async function scenarioSubscribe(mode, { streaming = false } = {}) {
  const updates = [];
  let enqueued;
  const result = await fal.subscribe(ENDPOINT, {
    input: INPUT,
    logs: true,
    ...(streaming ? { mode: "streaming" } : {}),
    onEnqueue: (id) => { enqueued = id; },
    onQueueUpdate: (update) => updates.push(update),
  });
  const where = streaming ? "subscribe(mode: streaming)" : "subscribe";
  check(typeof enqueued === "string" && enqueued.length > 0, `${where}: onEnqueue got no request id`);
  check(typeof result.requestId === "string" && result.requestId.length > 0,
    `${where}: result.requestId is empty (the result response needs an x-fal-request-id header)`);
  check(result.requestId === enqueued, `${where}: result.requestId ${result.requestId} != submitted id ${enqueued}`);
  check(updates.length >= 1, `${where}: onQueueUpdate was never called`);
  for (const u of updates) check(STATUSES.includes(u.status), `${where}: onQueueUpdate got an unknown status: ${short(u)}`);
  const last = updates[updates.length - 1];
  check(last.status === "COMPLETED", `${where}: the last queue update was ${short(last)}, expected status COMPLETED`);
  check(!last.error, `${where}: the COMPLETED update carries an error: ${short(last.error)}`);
  const image = await checkImages(result.data, where);
  return { requestId: result.requestId, updates: updates.map((u) => u.status), image };
}

function checkSubscribeWire(calls, streaming) {
  check(callsMatching(calls, "POST", RE.submit).length === 1, `expected one POST ${FAL_QUEUE}${ENDPOINT}`);
  check(callsMatching(calls, "GET", RE.result).length === 1, "expected one GET of the result URL");
  if (streaming) {
    const streams = callsMatching(calls, "GET", RE.stream);
    check(streams.length === 1, "streaming mode should open exactly one .../status/stream");
    check(logicalUrl(streams[0]).endsWith("?logs=1"), `status stream opened without logs=1: ${logicalUrl(streams[0])}`);
    check((streams[0].contentType || "").startsWith("text/event-stream"), `status stream answered content-type ${short(streams[0].contentType)}`);
    check(callsMatching(calls, "GET", RE.status).length === 0, "streaming mode should not poll /status");
  } else {
    const polls = callsMatching(calls, "GET", RE.status);
    check(polls.length >= 1, "polling mode made no /status calls");
    for (const p of polls) check(logicalUrl(p).endsWith("?logs=1"), `status polled without logs=1: ${logicalUrl(p)}`);
  }
}

async function scenarioQueue() {
  const submitted = await fal.queue.submit(ENDPOINT, { input: INPUT });
  const id = submitted.request_id;
  check(typeof id === "string" && id.length > 0, `submit: no request_id in ${short(submitted)}`);
  check(submitted.status === "IN_QUEUE", `submit: status is ${short(submitted.status)}, expected IN_QUEUE`);
  check(typeof submitted.queue_position === "number", `submit: queue_position missing: ${short(submitted)}`);
  for (const [key, suffix] of [["response_url", ""], ["status_url", "/status"], ["cancel_url", "/cancel"]]) {
    const url = submitted[key];
    check(typeof url === "string" && /^https?:\/\//.test(url), `submit: ${key} is not an absolute URL: ${short(url)}`);
    check(url.replace(/\/$/, "").endsWith(`/requests/${id}${suffix}`), `submit: ${key} ${url} does not end with /requests/${id}${suffix}`);
  }

  const seen = [];
  const deadline = Date.now() + TIMEOUT_S * 1000;
  let status;
  for (;;) {
    status = await fal.queue.status(ENDPOINT, { requestId: id, logs: true });
    check(STATUSES.includes(status.status), `status: unknown status ${short(status)}`);
    if (status.status === "IN_QUEUE") check("queue_position" in status, `status: IN_QUEUE without queue_position: ${short(status)}`);
    else check("logs" in status, `status: ${status.status} without a logs key although logs=1: ${short(status)}`);
    seen.push(status.status);
    if (status.status === "COMPLETED") break;
    check(Date.now() < deadline, `status: still ${status.status} after ${TIMEOUT_S}s`);
    await sleep(250);
  }
  check(!status.error, `status: COMPLETED with an error: ${short(status)}`);
  check(status.metrics && typeof status.metrics === "object", `status: COMPLETED without metrics: ${short(status)}`);
  check(status.logs === null || Array.isArray(status.logs), `status: logs is neither a list nor null: ${short(status.logs)}`);

  const quiet = await fal.queue.status(ENDPOINT, { requestId: id, logs: false });
  seen.push(quiet.status);
  check(quiet.status === "COMPLETED", `status(logs: false) after completion: ${short(quiet)}`);
  check(quiet.logs == null || quiet.logs.length === 0, `status(logs: false) still sent logs: ${short(quiet.logs)}`);

  const result = await fal.queue.result(ENDPOINT, { requestId: id });
  check(result.requestId === id, `result: requestId ${short(result.requestId)} != ${id} (x-fal-request-id header)`);
  const image = await checkImages(result.data, "queue.result");
  return { requestId: id, statuses: seen, log_entries: Array.isArray(status.logs) ? status.logs.length : null, image };
}

async function scenarioRun() {
  const result = await fal.run(ENDPOINT, { input: INPUT });
  check(typeof result.requestId === "string" && result.requestId.length > 0, "run: result.requestId is empty (x-fal-request-id header)");
  const image = await checkImages(result.data, "run");
  return { requestId: result.requestId, image };
}

async function scenarioValidation() {
  const out = {};
  out.run = checkValidationError(await expectThrow(fal.run(ENDPOINT, { input: BAD_INPUT })), "run");

  for (const streaming of [false, true]) {
    const where = streaming ? "subscribe(mode: streaming)" : "subscribe";
    let enqueued;
    const updates = [];
    const error = await expectThrow(fal.subscribe(ENDPOINT, {
      input: BAD_INPUT,
      logs: true,
      ...(streaming ? { mode: "streaming" } : {}),
      onEnqueue: (id) => { enqueued = id; },
      onQueueUpdate: (update) => updates.push(update),
    }));
    check(enqueued, `${where}: the submit was not accepted (queue mode validates after acceptance): ${error?.status} ${short(error?.body ?? error?.message)}`);
    const summary = checkValidationError(error, where);
    check(error.requestId === enqueued, `${where}: ValidationError.requestId ${short(error.requestId)} != ${enqueued} (x-fal-request-id on the 422)`);
    const last = updates[updates.length - 1];
    check(last?.status === "COMPLETED", `${where}: last queue update ${short(last)}, expected COMPLETED`);
    check(typeof last.error === "string" && last.error.length > 0, `${where}: the COMPLETED status of a failed request has no error string: ${short(last)}`);
    out[streaming ? "subscribe_streaming" : "subscribe"] = { ...summary, requestId: enqueued, completed_error: last.error, error_type: last.error_type ?? null };
  }
  return out;
}

async function waitCompleted(id, what) {
  const deadline = Date.now() + TIMEOUT_S * 1000;
  for (;;) {
    const status = await fal.queue.status(ENDPOINT, { requestId: id, logs: false });
    check(STATUSES.includes(status.status), `${what}: unknown status ${short(status)}`);
    if (status.status === "COMPLETED") return status;
    check(Date.now() < deadline, `${what}: still ${status.status} after ${TIMEOUT_S}s`);
    await sleep(200);
  }
}

async function scenarioCancel() {
  // The request to cancel must still be queued when the cancel arrives, so submit some requests
  // ahead of it and cancel right after its submit. A fast server (the tiny model) may get through
  // them first (the cancel answers 400 ALREADY_COMPLETED, or the request runs and has images):
  // then double the requests ahead and try again, a few times, before calling it a failure.
  let blockers;
  let target;
  let cancelCall;
  let after;
  let resultOutcome;
  const tooLate = [];
  for (let count = CANCEL_BLOCKERS; ; count *= 2) {
    const input = { ...INPUT, num_inference_steps: CANCEL_BLOCKER_STEPS };
    blockers = await Promise.all(Array.from({ length: count }, () => fal.queue.submit(ENDPOINT, { input })));
    target = await fal.queue.submit(ENDPOINT, { input: INPUT });
    check(target.status === "IN_QUEUE", `cancel: submit answered status ${short(target.status)}`);
    const callsBefore = wire.length;
    let why;
    try {
      const returned = await fal.queue.cancel(ENDPOINT, { requestId: target.request_id });
      check(returned === undefined, `cancel: the client returned ${short(returned)}`);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 400 && error.body?.status === "ALREADY_COMPLETED")) throw error;
      why = "cancel answered 400 ALREADY_COMPLETED";
    }
    const cancelCalls = callsMatching(wire.slice(callsBefore), "PUT", RE.cancel);
    check(cancelCalls.length === 1, `cancel: expected one PUT .../requests/${target.request_id}/cancel, saw ${cancelCalls.length}`);
    cancelCall = cancelCalls[0];
    if (!why) {
      check(cancelCall.status === 202, `cancel: answered HTTP ${cancelCall.status}, expected 202`);
      after = await waitCompleted(target.request_id, "cancelled request");
      // What result() gives for a cancelled request is not pinned down by fal: report it. Only
      // images mean the cancel came too late (the request was already running).
      try {
        const r = await fal.queue.result(ENDPOINT, { requestId: target.request_id });
        resultOutcome = { ok: true, data: short(r.data) };
        if (Array.isArray(r.data?.images) && r.data.images.length > 0) why = "cancel answered 202 but the request still ran and returned images";
      } catch (error) {
        resultOutcome = { ok: false, class: error?.constructor?.name, status: error?.status, body: short(error?.body) };
      }
    }
    if (!why) break;
    tooLate.push(`${count} ahead: ${why}`);
    for (const r of [...blockers, target]) await waitCompleted(r.request_id, "request submitted for the cancel test");
    check(tooLate.length < CANCEL_ATTEMPTS,
      `cancel: could not cancel a queued request (${tooLate.join("; ")}); either the server got through the requests `
      + "ahead of it first (raise FAL_CANCEL_BLOCKERS / FAL_CANCEL_BLOCKER_STEPS) or it does not cancel queued requests");
  }
  const id = target.request_id;

  // The queue keeps working: the request(s) ahead finish normally.
  for (const b of blockers) {
    const s = await waitCompleted(b.request_id, "request ahead of the cancelled one");
    check(!s.error, `cancel: the request ahead of the cancelled one failed: ${short(s)}`);
    const r = await fal.queue.result(ENDPOINT, { requestId: b.request_id });
    check(Array.isArray(r.data?.images) && r.data.images.length >= 1, `cancel: the request ahead returned no images: ${short(r.data)}`);
  }
  return {
    requestId: id, attempts: tooLate.length + 1, requests_ahead: blockers.length, queue_position_at_submit: target.queue_position,
    cancel_http: cancelCall.status,
    status_after: after.status, after_error: after.error ?? null, result_after_cancel: resultOutcome,
  };
}

/** A 96x80 24-bit BMP (a format simple enough to write by hand): a gradient, bottom-up rows. */
function bmp(width = 96, height = 80) {
  const row = Math.ceil((width * 3) / 4) * 4;
  const buffer = Buffer.alloc(54 + row * height);
  buffer.write("BM", 0);
  buffer.writeUInt32LE(buffer.length, 2);
  buffer.writeUInt32LE(54, 10);
  buffer.writeUInt32LE(40, 14);
  buffer.writeInt32LE(width, 18);
  buffer.writeInt32LE(height, 22);
  buffer.writeUInt16LE(1, 26);
  buffer.writeUInt16LE(24, 28);
  buffer.writeUInt32LE(row * height, 34);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const at = 54 + y * row + x * 3;
      buffer[at] = (x * 255) / width; // blue
      buffer[at + 1] = (y * 255) / height; // green
      buffer[at + 2] = 128; // red
    }
  }
  return buffer;
}

async function scenarioUpload() {
  const bytes = bmp();
  const url = await fal.storage.upload(new Blob([bytes], { type: "image/bmp" }));
  check(typeof url === "string" && url.startsWith(`${BASE}/files/`), `storage.upload answered ${short(url)}, not a file URL of ${BASE}`);
  const served = await fetch(url, { headers: { authorization: "Key test-key" } });
  check(served.ok, `GET ${url} answered HTTP ${served.status}`);
  check(Buffer.from(await served.arrayBuffer()).equals(bytes), `GET ${url} did not give back the uploaded bytes`);
  // The client uploads Blob inputs by itself (storage.transformInput) and sends their URLs instead.
  const result = await fal.subscribe(EDIT_ENDPOINT, {
    input: { ...INPUT, image_urls: [url, new Blob([bytes], { type: "image/bmp" })] },
  });
  const image = await checkImages(result.data, "subscribe(edit with uploaded references)");
  return { uploaded: url.slice(0, 120), image };
}

async function proxyEdgeCases() {
  // Not client calls: what the proxy answers to a call the client would never make.
  const missing = await fetch(PROXY_URL, { method: "GET", headers: { authorization: "Key test-key" } });
  check(missing.status === 400, `proxy without x-fal-target-url answered HTTP ${missing.status}, expected 400`);
  const foreign = await fetch(PROXY_URL, {
    method: "GET", headers: { authorization: "Key test-key", "x-fal-target-url": "https://example.com/fal-ai/flux-2/requests/x/status" },
  });
  check(foreign.status === 400, `proxy with a non-fal x-fal-target-url answered HTTP ${foreign.status}, expected 400`);
  return { missing_header: missing.status, foreign_host: foreign.status };
}

const RUNNERS = {
  subscribe: async (mode, calls) => {
    const r = await scenarioSubscribe(mode);
    checkSubscribeWire(calls(), false);
    checkStatusCodes(calls(), r.updates);
    return r;
  },
  stream: async (mode, calls) => {
    const r = await scenarioSubscribe(mode, { streaming: true });
    checkSubscribeWire(calls(), true);
    return r;
  },
  queue: async (mode, calls) => {
    const r = await scenarioQueue();
    checkStatusCodes(calls(), r.statuses);
    return r;
  },
  run: async (mode, calls) => {
    const r = await scenarioRun();
    check(callsMatching(calls(), "POST", RE.run).length === 1, `expected one POST ${FAL_RUN}${ENDPOINT}`);
    return r;
  },
  validation: async (mode, calls) => {
    const r = await scenarioValidation();
    const runCalls = callsMatching(calls(), "POST", RE.run);
    check(runCalls.length === 1 && runCalls[0].status === 422, "sync run of an invalid input should be answered 422 directly (one call)");
    check(callsMatching(calls(), "POST", RE.submit).every((c) => c.status === 200),
      "queue submit of an invalid input should be accepted (200); validation happens after acceptance");
    return r;
  },
  cancel: async () => scenarioCancel(),
  upload: async (mode, calls) => {
    const r = await scenarioUpload();
    const initiated = calls().filter((c) => c.method === "POST" && /\/storage\/upload\/initiate\?/.test(logicalUrl(c)));
    check(initiated.length === 2, `expected two upload initiations (one explicit, one for the Blob input), saw ${initiated.length}`);
    return r;
  },
};

/** ["a", "a", "a", "b"] -> ["a x3", "b"]: keeps the one-line summary readable when polling. */
function collapseRuns(lines) {
  const out = [];
  for (const line of lines) {
    const last = out[out.length - 1];
    if (last && last.line === line) last.n += 1;
    else out.push({ line, n: 1 });
  }
  return out.map(({ line, n }) => (n > 1 ? `${line} x${n}` : line));
}

async function runOne(name, mode) {
  configureClient(mode);
  const start = wire.length;
  const calls = () => wire.slice(start);
  const label = `${name}[${mode}]`;
  try {
    const result = await RUNNERS[name](mode, calls);
    checkWire(calls(), mode);
    return {
      ...result,
      calls: collapseRuns(calls().map((c) => `${c.method} ${logicalUrl(c).replace(/requests\/[^/?]+/, "requests/{id}")} -> ${c.status}`)),
    };
  } catch (error) {
    error.label = label;
    error.calls = calls();
    throw error;
  }
}

async function main() {
  const started = Date.now();
  const results = {};
  if (SCENARIOS.includes(scenario)) {
    results[scenario] = await runOne(scenario, "direct");
  } else {
    if (scenario === "all") for (const name of SCENARIOS) results[name] = await runOne(name, "direct");
    const proxied = {};
    for (const name of SCENARIOS) proxied[name] = await runOne(name, "proxy");
    try {
      proxied.edge_cases = await proxyEdgeCases();
    } catch (error) {
      error.label = "proxy[edge cases]";
      throw error;
    }
    results.proxy = proxied;
  }
  const line = { ok: true, scenario, server: BASE, endpoint: ENDPOINT, client: "@fal-ai/client@1.10.1", seconds: (Date.now() - started) / 1000, results };
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

const watchdog = setTimeout(() => {
  console.error(`FAIL ${scenario}: did not finish within ${TIMEOUT_S}s (FAL_TEST_TIMEOUT_S)`);
  dumpCalls(wire.slice(-15));
  process.exit(1);
}, TIMEOUT_S * 1000);
watchdog.unref();

function dumpCalls(calls) {
  if (!calls?.length) return;
  console.error("last wire calls:");
  for (const c of calls.slice(-15)) {
    console.error(`  ${c.method} ${c.url}${c.headers["x-fal-target-url"] ? ` (x-fal-target-url: ${c.headers["x-fal-target-url"]})` : ""} -> ${c.status ?? "no response"} ${c.contentType ?? ""}`);
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    const label = error.label || scenario;
    if (error instanceof Mismatch) {
      console.error(`FAIL ${label}: ${error.message}`);
    } else if (error instanceof ApiError) {
      console.error(`FAIL ${label}: the client threw ${error.constructor.name} (HTTP ${error.status}, request id ${error.requestId || "none"}): ${error.message}\n  body: ${short(error.body)}`);
    } else {
      console.error(`FAIL ${label}: unexpected error: ${error?.stack || error}${error?.cause ? `\n  cause: ${error.cause}` : ""}`);
    }
    dumpCalls(error.calls || wire);
    process.exit(1);
  },
);
