// The playground: submits to this server's fal queue API exactly as a fal client would, follows the
// status stream (Server-Sent Events), then fetches the result. Plain JavaScript, no dependencies.
"use strict";

const APP = "fal-ai/flux-2/lora";
const MAX_LORAS = 3;
const STEP_RE = /^step (\d+)\/(\d+)$/;

const $ = (id) => document.getElementById(id);

const ui = {
  form: $("gen-form"),
  prompt: $("prompt"),
  loras: $("loras"),
  addLora: $("add-lora"),
  loraTemplate: $("lora-row-template"),
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

// The request in flight: {submit: the submit answer, source: its EventSource, cancelled: bool}.
let current = null;

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

function buildInput() {
  const input = {
    prompt: ui.prompt.value,
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

function showResult(result, rawText, requestId) {
  (result.images || []).forEach((image, i) => {
    const figure = document.createElement("figure");
    const link = document.createElement("a");
    link.href = image.url;
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.id = `result-image-${i}`;
    img.src = image.url;
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
  ui.resultRequestId.textContent = requestId;
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

async function fetchResult(run, completed) {
  setStatus("Fetching the result…");
  let response;
  try {
    response = await fetch(run.submit.response_url, { headers: { Accept: "application/json" } });
  } catch (err) {
    return finish("Failed.", "Could not fetch the result", [String(err)]);
  }
  const { text, body } = await readBody(response);
  if (response.ok && body && typeof body === "object") {
    showResult(body, text, run.submit.request_id);
    const count = (body.images || []).length;
    return finish(`Done: ${count} image${count === 1 ? "" : "s"}.`);
  }
  const errorType = (body && body.error_type) || completed.error_type;
  if (errorType === "request_cancelled") return finish("Cancelled.");
  return finish("Failed.", `The request failed (${response.status})`, errorLines(response.status, body));
}

function finish(statusText, errorTitle, errorLinesList) {
  if (current && current.source) current.source.close();
  current = null;
  setBusy(false);
  setStatus(statusText);
  if (errorTitle) showError(errorTitle, errorLinesList);
}

function follow(run) {
  const source = new EventSource(`${run.submit.status_url}/stream?logs=1`);
  run.source = source;
  source.addEventListener("open", () => {
    // Each connection (a reconnect included) starts its logs from the beginning.
    ui.logs.textContent = "";
  });
  source.addEventListener("message", (event) => {
    if (current !== run) return;
    let update;
    try {
      update = JSON.parse(event.data);
    } catch {
      return;
    }
    appendLogs(update.logs);
    if (update.status === "IN_QUEUE") {
      const position = update.queue_position;
      setStatus(position ? `In queue: position ${position}.` : "In queue: next in line.");
    } else if (update.status === "IN_PROGRESS") {
      setStatus(run.cancelled ? "Cancelling…" : "Generating…");
    } else if (update.status === "COMPLETED") {
      source.close();
      fetchResult(run, update);
    }
  });
  source.addEventListener("error", () => {
    if (current === run && source.readyState !== EventSource.CLOSED) {
      setStatus("Connection to the status stream lost; reconnecting…");
    }
  });
}

async function submit(event) {
  event.preventDefault();
  if (current) return;
  resetOutput();
  let response;
  const body = buildInput();
  setBusy(true);
  setStatus("Submitting…");
  try {
    response = await fetch(`/queue/${APP}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body,
    });
  } catch (err) {
    return finish("Failed.", "Could not reach the server", [String(err)]);
  }
  const answer = await readBody(response);
  if (!response.ok || !answer.body || !answer.body.status_url) {
    return finish("Failed.", `Submit failed (${response.status})`, errorLines(response.status, answer.body));
  }
  current = { submit: answer.body, source: null, cancelled: false };
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
    const response = await fetch(run.submit.cancel_url, { method: "PUT" });
    if (response.status === 400) setStatus("Already completed.");
  } catch (err) {
    setStatus(`Cancel failed: ${err}`);
  }
}

// ---- Wiring ----------------------------------------------------------------------------------------

ui.addLora.addEventListener("click", () => {
  const row = addLora();
  if (row) row.querySelector(".lora-path").focus();
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

fetch("/ready")
  .then((response) => response.json())
  .then((ready) => {
    if (!ready || !ready.model) return;
    ui.serverInfo.textContent = `model: ${ready.model}${ready.device ? ` on ${ready.device}` : ""}`;
    ui.serverInfo.hidden = false;
  })
  .catch(() => {});
