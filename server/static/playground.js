// The playground: submits to this server's fal queue API exactly as a fal client would, follows the
// status stream (Server-Sent Events), then fetches the result. Plain JavaScript, no dependencies.
"use strict";

const APP = "fal-ai/flux-2/lora";
const EDIT_APP = "fal-ai/flux-2/lora/edit"; // with reference images
const MAX_LORAS = 3;
const STEP_RE = /^step (\d+)\/(\d+)$/;
const KEY_STORAGE = "flux2-playground-api-key"; // sessionStorage: kept across reloads, not past the tab
const RECONNECT_MS = 2000;
const NEEDS_KEY = ["The server needs an API key", ["Enter one in the API key field and try again."]];
const KEY_REFUSED = [
  "This API key is not accepted",
  ["Check the API key field: a request answers only to the key that submitted it."],
];

const $ = (id) => document.getElementById(id);

const ui = {
  form: $("gen-form"),
  prompt: $("prompt"),
  loras: $("loras"),
  addLora: $("add-lora"),
  loraTemplate: $("lora-row-template"),
  references: $("references"),
  referenceList: $("reference-list"),
  imageSize: $("image-size"),
  customSize: $("custom-size"),
  width: $("width"),
  height: $("height"),
  steps: $("steps"),
  guidance: $("guidance"),
  seed: $("seed"),
  numImages: $("num-images"),
  acceleration: $("acceleration"),
  outputFormat: $("output-format"),
  apiKey: $("api-key"),
  submit: $("submit"),
  cancel: $("cancel"),
  status: $("status"),
  progressWrap: $("progress-wrap"),
  progress: $("progress"),
  progressText: $("progress-text"),
  error: $("error"),
  images: $("images"),
  meta: $("result-meta"),
  resultSeed: $("result-seed"),
  reuseSeed: $("reuse-seed"),
  resultTime: $("result-time"),
  resultRequestId: $("result-request-id"),
  logs: $("logs"),
  serverInfo: $("server-info"),
};

// The request in flight: {submit: the submit answer, key: the API key it was sent with,
// abort: the AbortController of its status stream, cancelled: bool}.
let current = null;
// Object URLs of the images shown (fetched with the key), revoked when the next run starts.
let objectUrls = [];
// The reference images picked (File objects), with their thumbnails' object URLs.
let references = [];

// ---- The API key -----------------------------------------------------------------------------------

function apiKey() {
  return ui.apiKey.value.trim();
}

// Headers for a call to this server: `extra`, plus the API key when there is one.
function headers(key, extra = {}) {
  return key ? { ...extra, Authorization: `Key ${key}` } : extra;
}

// The plain [title, lines] for an answer that refuses the key, or null. A 404 counts when a key was
// sent: with keys on, a request's routes answer 404 to any key but the one that submitted it.
function keyProblem(status, key) {
  if (status === 401 || status === 403) return key ? KEY_REFUSED : NEEDS_KEY;
  return status === 404 && key ? KEY_REFUSED : null;
}

function storeKey() {
  try {
    if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage may be disabled: the key then lasts as long as the page.
  }
}

function restoreKey() {
  try {
    ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    // As above.
  }
}

// ---- LoRA rows -------------------------------------------------------------------------------------

function loraRows() {
  return Array.from(ui.loras.querySelectorAll(".lora-row"));
}

function renumberLoras() {
  loraRows().forEach((row, i) => {
    const path = row.querySelector(".lora-path");
    const scale = row.querySelector(".lora-scale");
    const [pathLabel, scaleLabel] = row.querySelectorAll("label");
    path.id = `lora-path-${i}`;
    scale.id = `lora-scale-${i}`;
    pathLabel.htmlFor = path.id;
    scaleLabel.htmlFor = scale.id;
    pathLabel.textContent = `LoRA ${i + 1} path`;
    scaleLabel.textContent = "Scale";
    const remove = row.querySelector(".remove-lora");
    remove.id = `remove-lora-${i}`;
    remove.setAttribute("aria-label", `Remove LoRA ${i + 1}`);
  });
  ui.addLora.disabled = loraRows().length >= MAX_LORAS;
}

function addLora(path = "", scale = 1) {
  if (loraRows().length >= MAX_LORAS) return null;
  const row = ui.loraTemplate.content.firstElementChild.cloneNode(true);
  row.querySelector(".lora-path").value = path;
  row.querySelector(".lora-scale").value = String(scale);
  row.querySelector(".remove-lora").addEventListener("click", () => {
    row.remove();
    renumberLoras();
    ui.addLora.focus();
  });
  ui.loras.appendChild(row);
  renumberLoras();
  return row;
}

// ---- Building the input ----------------------------------------------------------------------------

function numberOf(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

function buildInput(imageUrls = []) {
  const input = {
    prompt: ui.prompt.value,
    ...(imageUrls.length ? { image_urls: imageUrls } : {}),
    image_size:
      ui.imageSize.value === "custom"
        ? { width: numberOf(ui.width), height: numberOf(ui.height) }
        : ui.imageSize.value,
    num_inference_steps: numberOf(ui.steps),
    guidance_scale: numberOf(ui.guidance),
    num_images: Number(ui.numImages.value),
    acceleration: ui.acceleration.value,
    output_format: ui.outputFormat.value,
    loras: loraRows().map((row) => ({
      path: row.querySelector(".lora-path").value.trim(),
      scale: numberOf(row.querySelector(".lora-scale")),
    })),
  };
  if (input.image_size === "auto") delete input.image_size; // an edit takes its first reference's size
  let json = JSON.stringify(input);
  // Seeds go up to 2^64-1, beyond a JavaScript number's exact range: splice the digits in verbatim.
  const seed = ui.seed.value.trim();
  if (seed !== "") {
    json = json.slice(0, -1) + `,"seed":${/^\d+$/.test(seed) ? seed : JSON.stringify(seed)}}`;
  }
  return json;
}

// ---- Showing state ---------------------------------------------------------------------------------

function setStatus(text) {
  ui.status.textContent = text;
}

function setBusy(busy) {
  ui.submit.disabled = busy;
  ui.cancel.disabled = !busy;
  ui.form.setAttribute("aria-busy", String(busy));
}

function setProgress(step, total) {
  ui.progressWrap.hidden = false;
  ui.progress.max = total;
  ui.progress.value = step;
  ui.progressText.textContent = `step ${step}/${total}`;
}

function appendLogs(entries) {
  for (const entry of entries || []) {
    const time = (entry.timestamp || "").replace(/^.*T/, "").replace(/\.\d+Z?$/, "");
    ui.logs.textContent += `${time} ${entry.level || "INFO"} ${entry.message}\n`;
    const match = STEP_RE.exec(entry.message || "");
    if (match) setProgress(Number(match[1]), Number(match[2]));
  }
}

function clearFieldMarks() {
  for (const el of ui.form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// The form control a 422's `loc` points at, if there is one.
function fieldFor(loc) {
  const [field, index, sub] = loc;
  if (field === "image_urls") return ui.references;
  if (field === "loras" && typeof index === "number") {
    return $(sub === "scale" ? `lora-scale-${index}` : `lora-path-${index}`);
  }
  if (field === "image_size") {
    if (index === "width") return ui.width;
    if (index === "height") return ui.height;
    return ui.imageSize;
  }
  const ids = {
    prompt: "prompt",
    num_inference_steps: "steps",
    guidance_scale: "guidance",
    seed: "seed",
    num_images: "num-images",
    acceleration: "acceleration",
    output_format: "output-format",
  };
  return ids[field] ? $(ids[field]) : null;
}

// Turns any error body into plain lines, naming the field from a 422's `loc`.
function errorLines(status, body) {
  const detail = body && typeof body === "object" ? body.detail : null;
  if (Array.isArray(detail)) {
    return detail.map((item) => {
      const loc = (item.loc || []).filter((part, i) => !(i === 0 && part === "body"));
      const field = loc.join(".");
      const control = fieldFor(loc);
      if (control) control.setAttribute("aria-invalid", "true");
      return field ? `${field}: ${item.msg}` : String(item.msg);
    });
  }
  if (typeof detail === "string") return [detail];
  if (typeof body === "string" && body.trim()) return [body.trim()];
  return [`The server answered ${status}.`];
}

function showError(title, lines) {
  ui.error.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  ui.error.appendChild(strong);
  const list = document.createElement("ul");
  for (const line of lines) {
    const li = document.createElement("li");
    li.textContent = line;
    list.appendChild(li);
  }
  ui.error.appendChild(list);
  ui.error.hidden = false;
}

function resetOutput() {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  clearFieldMarks();
  ui.error.hidden = true;
  ui.error.replaceChildren();
  ui.images.replaceChildren();
  ui.meta.hidden = true;
  ui.logs.textContent = "";
  ui.progressWrap.hidden = true;
  ui.progress.value = 0;
  ui.progressText.textContent = "";
}

// An image's URL as the page can show it: with a key, a file URL is fetched with the key and shown
// through an object URL (an <img> cannot send headers); data URIs (sync mode) are shown as they are.
async function imageSource(url, key) {
  if (!key || url.startsWith("data:")) return url;
  const response = await fetch(url, { headers: headers(key) });
  if (!response.ok) {
    throw Object.assign(new Error(`The server answered ${response.status}.`), { status: response.status });
  }
  const objectUrl = URL.createObjectURL(await response.blob());
  objectUrls.push(objectUrl);
  return objectUrl;
}

async function showResult(result, rawText, run) {
  const images = result.images || [];
  const sources = await Promise.all(images.map((image) => imageSource(image.url, run.key)));
  images.forEach((image, i) => {
    const figure = document.createElement("figure");
    const link = document.createElement("a");
    link.href = sources[i];
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.id = `result-image-${i}`;
    img.src = sources[i];
    img.alt = `Generated image ${i + 1}: ${result.prompt || ""}`;
    if (image.width && image.height) {
      img.width = image.width;
      img.height = image.height;
    }
    link.appendChild(img);
    const caption = document.createElement("figcaption");
    caption.textContent = `${image.width}×${image.height} · ${image.content_type || ""}`;
    figure.append(link, caption);
    ui.images.appendChild(figure);
  });
  // The exact seed, read from the raw JSON: it may exceed a JavaScript number's exact range.
  const seedMatch = /"seed"\s*:\s*(\d+)/.exec(rawText);
  ui.resultSeed.textContent = seedMatch ? seedMatch[1] : String(result.seed ?? "");
  const seconds = result.timings && result.timings.inference;
  ui.resultTime.textContent = typeof seconds === "number" ? `${seconds.toFixed(2)} s` : "n/a";
  ui.resultRequestId.textContent = run.submit.request_id;
  ui.meta.hidden = false;
}

// ---- The request's life ----------------------------------------------------------------------------

async function readBody(response) {
  const text = await response.text();
  try {
    return { text, body: JSON.parse(text) };
  } catch {
    return { text, body: text };
  }
}

// Fails with the plain message (and the key field marked) when the answer refused the key, else with
// the given error.
function fail(status, key, title, lines) {
  const problem = keyProblem(status, key);
  if (problem) ui.apiKey.setAttribute("aria-invalid", "true");
  return finish("Failed.", ...(problem || [title, lines]));
}

async function fetchResult(run, completed) {
  setStatus("Fetching the result…");
  let response;
  try {
    response = await fetch(run.submit.response_url, {
      headers: headers(run.key, { Accept: "application/json" }),
    });
  } catch (err) {
    return finish("Failed.", "Could not fetch the result", [String(err)]);
  }
  const { text, body } = await readBody(response);
  if (response.ok && body && typeof body === "object") {
    try {
      await showResult(body, text, run);
    } catch (err) {
      return fail(err.status, run.key, "Could not fetch the images", [String(err)]);
    }
    const count = (body.images || []).length;
    return finish(`Done: ${count} image${count === 1 ? "" : "s"}.`);
  }
  const errorType = (body && body.error_type) || completed.error_type;
  if (errorType === "request_cancelled") return finish("Cancelled.");
  const title = `The request failed (${response.status})`;
  return fail(response.status, run.key, title, errorLines(response.status, body));
}

function finish(statusText, errorTitle, errorLinesList) {
  if (current) current.abort.abort();
  current = null;
  setBusy(false);
  setStatus(statusText);
  if (errorTitle) showError(errorTitle, errorLinesList);
}

// Handles one status update; true once the request has completed.
function onUpdate(run, data) {
  let update;
  try {
    update = JSON.parse(data);
  } catch {
    return false;
  }
  appendLogs(update.logs);
  if (update.status === "IN_QUEUE") {
    const position = update.queue_position;
    setStatus(position ? `In queue: position ${position}.` : "In queue: next in line.");
  } else if (update.status === "IN_PROGRESS") {
    setStatus(run.cancelled ? "Cancelling…" : "Generating…");
  } else if (update.status === "COMPLETED") {
    fetchResult(run, update);
    return true;
  }
  return false;
}

// Reads a Server-Sent Events body as it arrives, calling onData with each event's data, until onData
// returns true (then true) or the body ends (then false). Comments (`: ping` keep-alives) are skipped.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop(); // an incomplete line, kept for the next chunk
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") {
        // A blank line ends an event.
        if (data.length && onData(data.join("\n"))) {
          reader.cancel().catch(() => {});
          return true;
        }
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
  }
}

// Follows the status stream with fetch, which (unlike EventSource) can send the API key; reconnects,
// as EventSource would, when the connection drops before the request completes.
async function follow(run) {
  const url = `${run.submit.status_url}/stream?logs=1`;
  while (current === run) {
    try {
      const response = await fetch(url, {
        headers: headers(run.key, { Accept: "text/event-stream" }),
        signal: run.abort.signal,
      });
      if (response.ok) {
        // Each connection (a reconnect included) starts its logs from the beginning.
        ui.logs.textContent = "";
        if (await readEvents(response, (data) => current === run && onUpdate(run, data))) return;
      } else if (response.status < 500) {
        const { body } = await readBody(response);
        const title = `The status stream failed (${response.status})`;
        return fail(response.status, run.key, title, errorLines(response.status, body));
      }
    } catch {
      // A dropped connection, or finish() aborting the stream (then current is no longer run).
    }
    if (current !== run) return;
    setStatus("Connection to the status stream lost; reconnecting…");
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

// Uploads a reference image the way fal's JS client does: initiate, then PUT the bytes to the URL the
// server gave (which needs no key); resolves to the file's URL, for `image_urls`.
async function upload(file, key) {
  const started = await fetch("/storage/upload/initiate?storage_type=fal-cdn-v3", {
    method: "POST",
    headers: headers(key, { "Content-Type": "application/json", Accept: "application/json" }),
    body: JSON.stringify({ content_type: file.type || "application/octet-stream", file_name: file.name }),
  });
  const answer = await readBody(started);
  if (!started.ok) throw Object.assign(new Error(errorLines(started.status, answer.body).join(" ")), { status: started.status });
  const put = await fetch(answer.body.upload_url, {
    method: "PUT",
    headers: { "Content-Type": file.type || "application/octet-stream" },
    body: file,
  });
  if (!put.ok) {
    const failed = await readBody(put);
    throw Object.assign(new Error(errorLines(put.status, failed.body).join(" ")), { status: put.status });
  }
  return answer.body.file_url;
}

function showReferences() {
  ui.referenceList.replaceChildren();
  references.forEach((reference, i) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = reference.preview;
    img.alt = `Reference ${i + 1}: ${reference.file.name}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "link";
    remove.id = `remove-reference-${i}`;
    remove.textContent = "remove";
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(reference.preview);
      references.splice(i, 1);
      showReferences();
    });
    item.append(img, remove);
    ui.referenceList.appendChild(item);
  });
  // Without an explicit size, an edit takes its first reference's; text-to-image needs a size.
  const auto = ui.imageSize.querySelector('option[value="auto"]');
  auto.hidden = references.length === 0;
  if (references.length && ui.imageSize.value === "landscape_4_3") ui.imageSize.value = "auto";
  if (!references.length && ui.imageSize.value === "auto") ui.imageSize.value = "landscape_4_3";
}

async function submit(event) {
  event.preventDefault();
  if (current) return;
  resetOutput();
  let response;
  const key = apiKey();
  setBusy(true);
  let imageUrls = [];
  if (references.length) {
    setStatus(`Uploading ${references.length} reference image${references.length > 1 ? "s" : ""}…`);
    try {
      imageUrls = await Promise.all(references.map((reference) => upload(reference.file, key)));
    } catch (err) {
      ui.references.setAttribute("aria-invalid", "true");
      return fail(err.status, key, "Uploading a reference image failed", [err.message]);
    }
  }
  const body = buildInput(imageUrls);
  const app = imageUrls.length ? EDIT_APP : APP;
  setStatus("Submitting…");
  try {
    response = await fetch(`/queue/${app}`, {
      method: "POST",
      headers: headers(key, { "Content-Type": "application/json", Accept: "application/json" }),
      body,
    });
  } catch (err) {
    return finish("Failed.", "Could not reach the server", [String(err)]);
  }
  const answer = await readBody(response);
  if (!response.ok || !answer.body || !answer.body.status_url) {
    const title = `Submit failed (${response.status})`;
    return fail(response.status, key, title, errorLines(response.status, answer.body));
  }
  current = { submit: answer.body, key, abort: new AbortController(), cancelled: false };
  const position = answer.body.queue_position;
  setStatus(position ? `In queue: position ${position}.` : "In queue: next in line.");
  follow(current);
}

async function cancel() {
  const run = current;
  if (!run) return;
  run.cancelled = true;
  ui.cancel.disabled = true;
  setStatus("Cancelling…");
  try {
    const response = await fetch(run.submit.cancel_url, { method: "PUT", headers: headers(run.key) });
    const problem = keyProblem(response.status, run.key);
    if (response.status === 400) setStatus("Already completed.");
    else if (problem) showError(...problem);
  } catch (err) {
    setStatus(`Cancel failed: ${err}`);
  }
}

// ---- Wiring ----------------------------------------------------------------------------------------

ui.addLora.addEventListener("click", () => {
  const row = addLora();
  if (row) row.querySelector(".lora-path").focus();
});
ui.references.addEventListener("change", () => {
  for (const file of ui.references.files) references.push({ file, preview: URL.createObjectURL(file) });
  ui.references.value = ""; // the same file may be picked again
  ui.references.removeAttribute("aria-invalid");
  showReferences();
});
ui.imageSize.addEventListener("change", () => {
  ui.customSize.hidden = ui.imageSize.value !== "custom";
});
ui.reuseSeed.addEventListener("click", () => {
  ui.seed.value = ui.resultSeed.textContent;
  ui.seed.focus();
});
ui.form.addEventListener("input", (event) => {
  if (event.target.hasAttribute("aria-invalid")) event.target.removeAttribute("aria-invalid");
});
ui.form.addEventListener("submit", submit);
ui.cancel.addEventListener("click", cancel);
renumberLoras();
ui.customSize.hidden = ui.imageSize.value !== "custom";

restoreKey();
ui.apiKey.addEventListener("input", storeKey);

fetch("/ready", { headers: headers(apiKey()) })
  .then((response) => response.json())
  .then((ready) => {
    if (!ready || !ready.model) return;
    ui.serverInfo.textContent = `model: ${ready.model}${ready.device ? ` on ${ready.device}` : ""}`;
    ui.serverInfo.hidden = false;
  })
  .catch(() => {});
