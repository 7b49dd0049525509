// The skindistil page: upload one image, show /v1/predict's probabilities as bars and /v1/explain's overlay.
// Plain DOM code, no libraries; text from the server is only ever set with textContent.
"use strict";

// Descriptions of the ISIC 2019 and HAM10000 class codes; other label spaces show their codes only.
const CLASS_NAMES = {
  MEL: "melanoma", NV: "melanocytic nevus", BCC: "basal cell carcinoma", AK: "actinic keratosis",
  BKL: "benign keratosis", DF: "dermatofibroma", VASC: "vascular lesion", SCC: "squamous cell carcinoma",
  mel: "melanoma", nv: "melanocytic nevus", bcc: "basal cell carcinoma", akiec: "actinic keratosis / Bowen's",
  bkl: "benign keratosis", df: "dermatofibroma", vasc: "vascular lesion",
};

const $ = (id) => document.getElementById(id);
let currentRequest = 0;  // answers to an older upload are ignored
let previewUrl = null;
let overlayUrl = null;

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: fall through */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function loadModelInfo() {
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(await errorMessage(response));
    const info = await response.json();
    $("model-name").textContent = info.model.name;
    const arch = info.architecture.kwargs || {};
    const parts = [
      info.model.role,
      arch.depth ? `ViT, ${arch.depth} blocks, width ${arch.embed_dim}` : info.architecture.name,
      `${info.classes.length} classes`,
      `version ${info.model.version}`,
    ];
    const bma = info.metrics && info.metrics.test && info.metrics.test.balanced_accuracy;
    if (typeof bma === "number") parts.push(`test balanced accuracy ${bma.toFixed(4)}`);
    $("model-details").textContent = parts.filter(Boolean).join(" · ");
    document.title = `skindistil: ${info.model.name} (research tool)`;
  } catch (err) {
    $("model-name").textContent = "model unavailable";
    showError(`Cannot read the model information: ${err.message}`);
  }
}

function renderBars(probabilities) {
  const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  const list = $("bars");
  list.replaceChildren();
  entries.forEach(([name, probability], rank) => {
    const item = document.createElement("li");
    item.className = rank === 0 ? "bar top" : "bar";
    item.dataset.class = name;
    item.dataset.probability = String(probability);

    const label = document.createElement("span");
    label.className = "bar-label";
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = name;
    label.append(code);
    if (CLASS_NAMES[name]) label.append(` ${CLASS_NAMES[name]}`);

    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(probability * 100).toFixed(2)}%`;
    track.append(fill);

    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = probability.toFixed(4);

    item.append(label, track, value);
    list.append(item);
  });
}

// One line per stored operating point, e.g. "cancer@sens95: positive (score 0.4312 >= threshold 0.2100;
// MEL + BCC + SCC, threshold chosen for 95% sensitivity on validation)".
function renderDecisions(decisions) {
  const list = $("decisions");
  list.replaceChildren();
  decisions.forEach((d) => {
    const item = document.createElement("li");
    item.className = d.positive ? "decision positive" : "decision negative";
    item.dataset.point = d.name;
    item.dataset.positive = String(d.positive);
    const comparison = d.positive ? ">=" : "<";
    item.textContent =
      `${d.name}: ${d.positive ? "positive" : "negative"} (score ${d.score.toFixed(4)} ${comparison} threshold ` +
      `${d.threshold.toFixed(4)}; ${d.positive_classes.join(" + ")}, threshold chosen for ` +
      `${Math.round(d.level * 100)}% ${d.target} on validation)`;
    list.append(item);
  });
  list.hidden = decisions.length === 0;
}

async function predict(file, request) {
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("/v1/predict", { method: "POST", body: form });
  if (request !== currentRequest) return null;
  if (!response.ok) throw new Error(await errorMessage(response));
  const result = await response.json();
  if (request !== currentRequest) return null;
  renderBars(result.probabilities);
  renderDecisions(result.operating_points || []);
  const top = result.top_class;
  $("top-class").textContent =
    `Most probable: ${top}${CLASS_NAMES[top] ? ` (${CLASS_NAMES[top]})` : ""}, probability ${result.top_probability.toFixed(4)}`;
  const ms = result.latency_ms;
  $("timing").textContent =
    `Answered in ${ms.total.toFixed(1)} ms (model ${ms.model.toFixed(1)} ms in a batch of ${result.batch_size}) ` +
    `by ${result.model.name}, version ${result.model.version}.`;
  $("results").hidden = false;
  $("status").textContent = `Prediction for ${file.name} ready.`;
  return result;
}

async function explain(file, request) {
  const form = new FormData();
  form.append("file", file);
  $("overlay-status").textContent = "Computing the attention overlay…";
  const response = await fetch("/v1/explain", { method: "POST", body: form });
  if (request !== currentRequest) return;
  if (!response.ok) {
    $("overlay-status").textContent = `No overlay: ${await errorMessage(response)}`;
    return;
  }
  const blob = await response.blob();
  if (request !== currentRequest) return;
  if (overlayUrl) URL.revokeObjectURL(overlayUrl);
  overlayUrl = URL.createObjectURL(blob);
  const overlay = $("overlay");
  overlay.onload = () => {
    $("overlay-figure").hidden = false;
    $("overlay-status").textContent = "Attention overlay ready.";
  };
  overlay.src = overlayUrl;
}

async function handleFile(file) {
  if (!file) return;
  const request = ++currentRequest;
  $("error").hidden = true;
  $("results").hidden = true;
  $("overlay-figure").hidden = true;
  $("status").textContent = `Predicting ${file.name}…`;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview-caption").textContent = `${file.name} (${(file.size / 1024).toFixed(1)} KiB)`;
  $("preview-figure").hidden = false;
  try {
    if (!(await predict(file, request))) return;
    await explain(file, request);
  } catch (err) {
    if (request !== currentRequest) return;
    $("status").textContent = "No prediction.";
    $("overlay-status").textContent = "";
    showError(err.message);
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    handleFile(event.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("file-input").addEventListener("change", (event) => handleFile(event.target.files[0]));
  $("upload-form").addEventListener("submit", (event) => event.preventDefault());
  setUpDropZone();
  loadModelInfo();
});
