// The page for people: a form built from the served model's feature schema (GET /model), its answer with
// charts, a file upload, and the model's card. Plain JavaScript and inline SVG: nothing is loaded from
// anywhere but this server. Each chart has a table beside it for screen readers and for exact figures.
"use strict";

const KEY_STORAGE = "tabserve.apiKey";
// How often the model is read again, so that the page follows a new champion even when nobody predicts.
const MODEL_REFRESH_MS = 30000;
// Bars drawn in the attribution and importance charts; the rest are summed into one bar.
const TOP_FEATURES = 12;
// Rows of an uploaded file's predictions shown on the page (the download has them all).
const SHOWN_ROWS = 50;
const SVG = "http://www.w3.org/2000/svg";
// Chart colours (style.css has the same): bars, and attributions that push the output up or down.
const BAR = "#3a5a8c";
const UP = "#b3261e";
const DOWN = "#0b57d0";

const state = {
  model: null,           // the last GET /model answer
  explainServed: true,   // false once POST /explain answered 404: predictions only from then on
  fileCsv: null,         // the object URL of the last file's predictions as CSV
};

// ---- talking to the API -----------------------------------------------------------------------------

class AuthNeeded extends Error {}

// A call to the API with the key the person gave (serving/auth.py reads `Authorization: Bearer`).
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    askForKey(await errorText(response));
    throw new AuthNeeded("an API key is needed");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function askForKey(message) {
  const form = byId("key-form");
  form.hidden = false;
  byId("key-why").textContent =
    `${message}. The key is kept in this tab only (session storage).`;
  byId("api-key").focus();
}

function byId(id) {
  return document.getElementById(id);
}

function element(tag, attributes = {}, ...children) {
  const made = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) made.setAttribute(name, value);
  }
  made.append(...children.filter((child) => child !== null && child !== undefined));
  return made;
}

function svgElement(tag, attributes = {}, text) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  if (text !== undefined) made.textContent = text;
  return made;
}

function formatNumber(value, digits = 4) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e9) return String(value);
  return Number(value.toPrecision(digits)).toString();
}

function percent(value) {
  return `${(100 * value).toFixed(1)}%`;
}

// ---- the served model -------------------------------------------------------------------------------

async function loadModel() {
  const response = await api("/model");
  if (!response.ok) throw new Error(`GET /model: ${await errorText(response)}`);
  const model = await response.json();
  const changed = !state.model || state.model.version !== model.version;
  state.model = model;
  showServed(model, changed);
  if (changed) buildForm(model);
  renderCard(model);
}

function showServed(model, changed) {
  byId("model-name").textContent = `· ${model.model}`;
  const text = `Serving ${model.model}, registered version ${model.registered_version} ` +
    `(${model.version}), a ${model.task} model.`;
  const served = byId("served");
  // Said again only when it changes, so a screen reader hears a new champion once.
  if (changed) served.textContent = text;
  byId("file-hint").textContent =
    `Columns: ${model.feature_schema.features.map((f) => f.name).join(", ")}. ` +
    "Other columns are refused.";
}

// An answer names the version that made it: a new one means the champion changed under the page.
async function followVersion(version) {
  if (state.model && version && version !== state.model.version) await loadModel();
}

// ---- the form ---------------------------------------------------------------------------------------

function fieldId(index) {
  return `f-${index}`;
}

function buildForm(model) {
  const kept = currentValues();
  const fields = byId("fields");
  fields.replaceChildren();
  model.feature_schema.features.forEach((feature, index) => {
    fields.append(fieldFor(feature, index, kept.get(feature.name)));
  });
}

function currentValues() {
  const values = new Map();
  for (const control of byId("fields").querySelectorAll("[data-feature]")) {
    values.set(control.dataset.feature, control.value);
  }
  return values;
}

function fieldFor(feature, index, kept) {
  const id = fieldId(index);
  const hint = element("p", { id: `${id}-hint`, class: "hint" }, describe(feature));
  const error = element("p", { id: `${id}-error`, class: "error" });
  const common = {
    id,
    "data-feature": feature.name,
    "aria-describedby": `${id}-hint ${id}-error`,
  };
  let control;
  if (feature.kind === "boolean") {
    control = element(
      "select",
      common,
      element("option", { value: "true" }, "true"),
      element("option", { value: "false" }, "false"),
      feature.nullable ? element("option", { value: "" }, "missing") : null,
    );
    control.value = kept ?? "false";
  } else if (feature.kind === "categorical") {
    // A choice list of the categories seen in training that still takes any other text.
    const listId = `${id}-choices`;
    control = element("input", { ...common, type: "text", list: listId, autocomplete: "off" });
    control.value = kept ?? (feature.categories[0] || "");
    return element(
      "div",
      { class: "field" },
      element("label", { for: id }, feature.name),
      control,
      element("datalist", { id: listId }, ...feature.categories.map((c) => element("option", { value: c }))),
      hint,
      error,
    );
  } else {
    // Text, not type=number: what the person typed reaches the server, which says what is wrong with it.
    control = element("input", { ...common, type: "text", inputmode: "decimal", autocomplete: "off" });
    control.value = kept ?? defaultNumber(feature);
  }
  return element("div", { class: "field" }, element("label", { for: id }, feature.name), control, hint, error);
}

function describe(feature) {
  const missing = feature.nullable ? " Empty: missing." : "";
  if (feature.kind === "numeric") {
    const range = feature.minimum !== undefined
      ? `training range ${formatNumber(feature.minimum)} to ${formatNumber(feature.maximum)}.`
      : "a number.";
    return `Number, ${range}${missing}`;
  }
  if (feature.kind === "categorical") {
    const seen = feature.categories.length;
    return `Text: one of ${seen} categories seen in training, or a new one.${missing}`;
  }
  return `true or false.${feature.nullable ? " Or missing." : ""}`;
}

function defaultNumber(feature) {
  if (feature.minimum === undefined) return "";
  return formatNumber((feature.minimum + feature.maximum) / 2, 3);
}

const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;

// The record as JSON, keyed by column name. An empty field is null (missing) where the column may be
// missing, else left out for the server to name; text that is no number is sent as it is, for the same.
function recordFromForm() {
  const record = {};
  for (const feature of state.model.feature_schema.features) {
    const control = document.querySelector(`[data-feature="${CSS.escape(feature.name)}"]`);
    const text = control.value.trim();
    if (text === "") {
      if (feature.nullable) record[feature.name] = null;
      continue;
    }
    if (feature.kind === "boolean") record[feature.name] = text === "true";
    else if (feature.kind === "numeric") record[feature.name] = NUMBER.test(text) ? Number(text) : text;
    else record[feature.name] = text;
  }
  return record;
}

function clearErrors() {
  byId("form-error").textContent = "";
  for (const control of byId("fields").querySelectorAll("[data-feature]")) {
    control.removeAttribute("aria-invalid");
    byId(`${control.id}-error`).textContent = "";
  }
}

// The problems of a 400 body, per column where the server names one: pydantic's `detail` (`loc` ends with
// the column), or the data plane's "'column': problem" (serving/dataplane.py).
function problemsByField(body) {
  const names = new Set(state.model.feature_schema.features.map((f) => f.name));
  const found = new Map();
  for (const problem of body.detail || []) {
    const column = [...(problem.loc || [])].reverse().find((part) => names.has(part));
    if (column !== undefined && !found.has(column)) found.set(column, problem.msg);
  }
  const quoted = /^(?:record \d+, )?'(.+?)': ([\s\S]*)$/.exec(body.error || "");
  if (found.size === 0 && quoted && names.has(quoted[1])) found.set(quoted[1], quoted[2]);
  return found;
}

function showProblems(body) {
  const problems = problemsByField(body);
  let first = null;
  for (const [column, message] of problems) {
    const control = document.querySelector(`[data-feature="${CSS.escape(column)}"]`);
    control.setAttribute("aria-invalid", "true");
    byId(`${control.id}-error`).textContent = message;
    first = first || control;
  }
  const summary = problems.size
    ? `Please check ${[...problems.keys()].join(", ")}: ${[...problems.values()].join("; ")}`
    : body.error || "the server refused the record";
  byId("form-error").textContent = summary;
  if (first) first.focus();
}

async function onPredict(event) {
  event.preventDefault();
  const button = event.submitter || byId("record-form").querySelector("button");
  button.disabled = true;
  clearErrors();
  try {
    const { response, explained } = await scoreRecord(recordFromForm());
    const body = await response.json();
    if (!response.ok) {
      if (response.status === 400 || response.status === 422) showProblems(body);
      else byId("form-error").textContent = `${response.status}: ${body.error || response.statusText}`;
      return;
    }
    renderAnswer(body, explained);
    await followVersion(body.version);
  } catch (error) {
    if (!(error instanceof AuthNeeded)) byId("form-error").textContent = String(error.message || error);
  } finally {
    button.disabled = false;
  }
}

// POST /explain when the server has it (the answer of /predict plus `explanation`), else POST /predict.
async function scoreRecord(record) {
  const request = {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(record),
  };
  if (state.explainServed) {
    const response = await api("/explain", request);
    if (response.status !== 404) return { response, explained: true };
    state.explainServed = false;
  }
  return { response: await api("/predict", request), explained: false };
}

// ---- the answer -------------------------------------------------------------------------------------

function renderAnswer(answer, explained) {
  const parts = [
    element("p", { class: "prediction" }, "Prediction: ", element("strong", {}, String(answer.prediction))),
    element(
      "p",
      { class: "hint" },
      `By ${answer.model} registered version ${answer.registered_version} (${answer.version}); ` +
        `request ${answer.request_id}.`,
    ),
  ];
  const unknown = Object.entries(answer.unknown_categories || {});
  if (unknown.length) {
    parts.push(element(
      "p",
      {},
      "Never seen in training: " + unknown.map(([column, value]) => `${column} = "${value}"`).join(", ") +
        ". The model treats them as unknown categories.",
    ));
  }
  if (answer.probabilities) parts.push(probabilityChart(answer.probabilities));
  if (answer.explanation) parts.push(attributionChart(answer.explanation));
  else if (!explained) {
    parts.push(element("p", { class: "hint" }, "Explanations are not served by this version of the service."));
  }
  byId("answer").replaceChildren(...parts);
}

// Horizontal bars, one per row of [label, value]; values in [min, max] drawn from a zero line.
function barChart({ title, rows, format, minimum = 0, maximum = 1, colour }) {
  const labelWidth = 170;
  const width = 640;
  const barSpace = width - labelWidth - 80;
  const rowHeight = 24;
  const height = rows.length * rowHeight + 8;
  const scale = (value) => ((value - minimum) / (maximum - minimum || 1)) * barSpace;
  const zero = labelWidth + scale(0);
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${title}: ${rows.map(([label, value]) => `${label} ${format(value)}`).join(", ")}`,
  });
  rows.forEach(([label, value], index) => {
    const y = 4 + index * rowHeight;
    const shortLabel = label.length > 24 ? `${label.slice(0, 23)}…` : label;
    svg.append(svgElement("text", { x: labelWidth - 6, y: y + 16, "text-anchor": "end" }, shortLabel));
    const start = Math.min(zero, labelWidth + scale(value));
    const barWidth = Math.max(1, Math.abs(labelWidth + scale(value) - zero));
    svg.append(svgElement("rect", { x: start, y: y + 3, width: barWidth, height: rowHeight - 8, fill: colour(value) }));
    svg.append(svgElement("text", { x: start + barWidth + 6, y: y + 16 }, format(value)));
  });
  if (minimum < 0) {
    svg.append(svgElement("line", { x1: zero, x2: zero, y1: 0, y2: height, stroke: "#1a1a1a" }));
  }
  const table = element(
    "table",
    {},
    element("caption", {}, title),
    element("thead", {}, element("tr", {}, element("th", { scope: "col" }, "Name"), element("th", { scope: "col" }, "Value"))),
    element("tbody", {}, ...rows.map(([label, value]) => element(
      "tr",
      {},
      element("th", { scope: "row" }, label),
      element("td", { class: "number" }, format(value)),
    ))),
  );
  return element(
    "figure",
    { class: "chart" },
    element("figcaption", {}, element("h3", {}, title)),
    svg,
    element("details", {}, element("summary", {}, "The figures as a table"), table),
  );
}

function probabilityChart(probabilities) {
  const rows = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  return barChart({ title: "Probability of each class", rows, format: percent, colour: () => BAR });
}

// The largest attributions by size, the rest summed: `base_value` + all attributions = `output_value`.
function topRows(values) {
  const sorted = Object.entries(values).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
  const top = sorted.slice(0, TOP_FEATURES);
  const rest = sorted.slice(TOP_FEATURES);
  if (rest.length) top.push([`${rest.length} other features`, rest.reduce((sum, [, v]) => sum + v, 0)]);
  return top;
}

function attributionChart(explanation) {
  const rows = topRows(explanation.attributions);
  const extent = Math.max(...rows.map(([, v]) => Math.abs(v)), 1e-12);
  const of = explanation.explained_class !== null && explanation.explained_class !== undefined
    ? ` of class ${explanation.explained_class}` : "";
  const title = `Why: each feature's contribution to the ${explanation.output.replace("_", "-")}${of}`;
  const figure = barChart({
    title,
    rows,
    format: (v) => (v > 0 ? "+" : "") + formatNumber(v, 3),
    minimum: -extent,
    maximum: extent,
    colour: (v) => (v >= 0 ? UP : DOWN),
  });
  figure.append(element(
    "p",
    { class: "hint" },
    `Starts from the base value ${formatNumber(explanation.base_value)} (the average output) and adds ` +
      `each contribution to reach ${formatNumber(explanation.output_value)}. Red bars push the output up, ` +
      `blue bars push it down. Method: ${explanation.method}.`,
  ));
  return figure;
}

// ---- a file -----------------------------------------------------------------------------------------

async function onScoreFile(event) {
  event.preventDefault();
  const input = byId("table-file");
  const error = byId("file-error");
  error.textContent = "";
  input.removeAttribute("aria-invalid");
  const file = input.files[0];
  if (!file) {
    input.setAttribute("aria-invalid", "true");
    error.textContent = "Choose a CSV or Parquet file first.";
    input.focus();
    return;
  }
  const button = event.submitter || byId("file-form").querySelector("button");
  button.disabled = true;
  try {
    const response = await api("/predict_file?format=json", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: file,
    });
    const body = await response.json();
    if (!response.ok) {
      input.setAttribute("aria-invalid", "true");
      error.textContent = body.error || `${response.status} ${response.statusText}`;
      return;
    }
    renderFileResult(file.name, body);
    await followVersion(body.version);
  } catch (problem) {
    if (!(problem instanceof AuthNeeded)) error.textContent = String(problem.message || problem);
  } finally {
    button.disabled = false;
  }
}

// The columns of the service's own CSV output (serving/files.py): prediction, probability_<class>,
// unknown_categories (when the model has categorical features).
function fileColumns(predictions) {
  const classes = Object.keys(predictions[0].probabilities || {});
  const categorical = state.model.feature_schema.features.some((f) => f.kind === "categorical");
  return [
    ["prediction", (p) => p.prediction],
    ...classes.map((label) => [`probability_${label}`, (p) => p.probabilities[label]]),
    ...(categorical ? [["unknown_categories", (p) => JSON.stringify(p.unknown_categories)]] : []),
  ];
}

function csvCell(value) {
  const text = String(value);
  return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function renderFileResult(name, body) {
  const predictions = body.predictions;
  const columns = fileColumns(predictions);
  const csv = [columns.map(([title]) => title), ...predictions.map((p) => columns.map(([, get]) => get(p)))]
    .map((row) => row.map(csvCell).join(","))
    .join("\n") + "\n";
  if (state.fileCsv) URL.revokeObjectURL(state.fileCsv);
  state.fileCsv = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
  const shown = predictions.slice(0, SHOWN_ROWS);
  const table = element(
    "table",
    {},
    element("caption", {}, `Predictions for ${name}` +
      (predictions.length > SHOWN_ROWS ? ` (the first ${SHOWN_ROWS} rows)` : "")),
    element("thead", {}, element("tr", {}, element("th", { scope: "col" }, "row"),
      ...columns.map(([title]) => element("th", { scope: "col" }, title)))),
    element("tbody", {}, ...shown.map((p, row) => element(
      "tr",
      {},
      element("th", { scope: "row" }, String(row)),
      ...columns.map(([, get]) => {
        const value = get(p);
        return element("td", { class: typeof value === "number" ? "number" : null },
          typeof value === "number" ? formatNumber(value) : String(value));
      }),
    ))),
  );
  byId("file-result").replaceChildren(
    element("p", {}, `${predictions.length} rows scored by ${body.model} registered version ` +
      `${body.registered_version} (${body.version}).`),
    element("a", {
      class: "download",
      href: state.fileCsv,
      download: `${name.replace(/\.[^.]*$/, "")}-predictions.csv`,
    }, "Download the predictions (CSV)"),
    element("div", { class: "scroll" }, table),
  );
}

// ---- the model's card -------------------------------------------------------------------------------

function renderCard(model) {
  byId("card-body").replaceChildren(
    element("h3", {}, "Lineage"),
    lineage(model),
    element("h3", {}, "Test metrics"),
    metricsTable(model),
    element("h3", {}, model.task === "classification" ? "Confusion matrix (test set)" : "Residuals (test set)"),
    evaluation(model),
    element("h3", {}, "Global importance"),
    importance(model),
    element("h3", {}, "Monitoring"),
    monitoring(model.monitoring || {}),
  );
}

function lineage(model) {
  const facts = [
    ["Model", model.model],
    ["Version", model.version],
    ["Registered version", `${model.registered_version}${model.alias ? ` (${model.alias})` : ""}`],
    ["MLflow run", model.mlflow_run_id],
    ["Data digest", model.data_digest],
    ["Trained at", model.trained_at],
    ["Estimator", model.estimator],
    ["Task", model.classes ? `${model.task}: ${model.classes.join(", ")}` : model.task],
    ["Scorer", model.scorer ? model.scorer.scorer : "—"],
  ];
  return element("dl", { class: "lineage" },
    ...facts.flatMap(([term, value]) => [element("dt", {}, term), element("dd", {}, String(value))]));
}

function metricsTable(model) {
  const rows = Object.entries(model.test_metrics || {});
  return element("div", { class: "scroll" }, element(
    "table",
    {},
    element("thead", {}, element("tr", {}, element("th", { scope: "col" }, "Metric"), element("th", { scope: "col" }, "Value"))),
    element("tbody", {}, ...rows.map(([name, value]) => element(
      "tr",
      {},
      element("th", { scope: "row" }, name === model.metric ? `${name} (the metric it was chosen by)` : name),
      element("td", { class: "number" }, formatNumber(value)),
    ))),
  ));
}

function notRecorded() {
  return element("p", { class: "hint" }, "Not recorded for this version.");
}

function evaluation(model) {
  const found = model.evaluation;
  if (!found) return notRecorded();
  if (found.matrix && found.labels) return confusionMatrix(found.labels, found.matrix);
  const pairs = predictedActualPairs(found);
  return pairs.length ? residualPlot(pairs) : notRecorded();
}

// A table is the chart here: counts with the cell's share as its shade, readable as it is.
function confusionMatrix(labels, matrix) {
  const largest = Math.max(1, ...matrix.flat());
  return element("div", { class: "scroll" }, element(
    "table",
    {},
    element("caption", {}, "Rows: actual class; columns: predicted class"),
    element("thead", {}, element("tr", {}, element("td", {}),
      ...labels.map((label) => element("th", { scope: "col" }, `predicted ${label}`)))),
    element("tbody", {}, ...matrix.map((row, i) => element(
      "tr",
      {},
      element("th", { scope: "row" }, `actual ${labels[i]}`),
      ...row.map((count) => element("td", {
        class: "number",
        // Light shades only, so the dark text keeps its contrast.
        style: `background: rgba(58, 90, 140, ${(0.35 * count) / largest})`,
      }, String(count))),
    ))),
  ));
}

// (predicted, actual) pairs from whichever shape the training run recorded.
function predictedActualPairs(found) {
  if (Array.isArray(found.pairs)) return found.pairs.map((p) => (Array.isArray(p) ? p : [p.predicted, p.actual]));
  if (Array.isArray(found.predicted) && Array.isArray(found.actual)) {
    return found.predicted.map((p, i) => [p, found.actual[i]]);
  }
  return [];
}

function residualPlot(pairs) {
  const width = 640;
  const height = 300;
  const margin = 50;
  const residuals = pairs.map(([p, a]) => a - p);
  const [xMin, xMax] = [Math.min(...pairs.map((p) => p[0])), Math.max(...pairs.map((p) => p[0]))];
  const extent = Math.max(...residuals.map(Math.abs), 1e-12);
  const x = (v) => margin + ((v - xMin) / (xMax - xMin || 1)) * (width - 2 * margin);
  const y = (v) => height / 2 - (v / extent) * (height / 2 - 20);
  const meanAbs = residuals.reduce((s, r) => s + Math.abs(r), 0) / residuals.length;
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `Residual plot of ${pairs.length} test rows: predicted value across, actual minus ` +
      `predicted up; mean absolute residual ${formatNumber(meanAbs)}, largest ${formatNumber(extent)}.`,
  });
  svg.append(svgElement("line", { x1: margin, x2: width - margin, y1: y(0), y2: y(0), stroke: "#1a1a1a" }));
  pairs.forEach(([p], i) => {
    svg.append(svgElement("circle", { cx: x(p), cy: y(residuals[i]), r: 3, fill: BAR }));
  });
  svg.append(svgElement("text", { x: width / 2, y: height - 4, "text-anchor": "middle" }, "predicted"));
  svg.append(svgElement("text", { x: margin, y: height - 4 }, formatNumber(xMin, 3)));
  svg.append(svgElement("text", { x: width - margin, y: height - 4, "text-anchor": "end" }, formatNumber(xMax, 3)));
  svg.append(svgElement("text", { x: 4, y: 14 }, `actual − predicted (up to ±${formatNumber(extent, 3)})`));
  svg.append(svgElement("text", { x: 4, y: y(0) - 4 }, "0"));
  const table = element(
    "table",
    {},
    element("caption", {}, `The first ${Math.min(20, pairs.length)} of ${pairs.length} pairs`),
    element("thead", {}, element("tr", {}, element("th", { scope: "col" }, "predicted"), element("th", { scope: "col" }, "actual"))),
    element("tbody", {}, ...pairs.slice(0, 20).map(([p, a]) => element(
      "tr",
      {},
      element("td", { class: "number" }, formatNumber(p)),
      element("td", { class: "number" }, formatNumber(a)),
    ))),
  );
  return element("figure", { class: "chart" }, svg,
    element("details", {}, element("summary", {}, "The figures as a table"), table));
}

function importance(model) {
  const found = model.importance;
  if (!found || typeof found !== "object") return notRecorded();
  // Per column: a number, or an object with its mean (and spread) over the permutation repeats.
  const source = found.importances || found;
  const values = Object.fromEntries(Object.entries(source).map(([column, value]) => [
    column,
    typeof value === "number" ? value : value.mean ?? value.importances_mean ?? NaN,
  ]).filter(([, value]) => Number.isFinite(value)));
  if (!Object.keys(values).length) return notRecorded();
  const rows = topRows(values);
  const low = Math.min(0, ...rows.map(([, v]) => v));
  const high = Math.max(...rows.map(([, v]) => v), 1e-12);
  const extent = Math.max(high, -low);
  return barChart({
    title: "Permutation importance: the test metric lost when a column is shuffled",
    rows,
    format: (v) => formatNumber(v, 3),
    minimum: low < 0 ? -extent : 0,
    maximum: extent,
    colour: () => BAR,
  });
}

function monitoring(found) {
  const drift = found.drift;
  const performance = found.performance;
  const items = [];
  if (drift) {
    const verdict = drift.drift_detected ? "drift detected" : "no drift";
    items.push(element(
      "li",
      {},
      "Data drift: ",
      element("span", { class: drift.drift_detected ? "status-bad" : "status-good" }, verdict),
      ` (${percent(drift.drift_share)} of the columns drifted` +
        `${drift.drifted_features && drift.drifted_features.length ? `: ${drift.drifted_features.join(", ")}` : ""}` +
        `; ${drift.rows_compared} live rows compared; version ${drift.version}; ${drift.finished_at}).`,
    ));
  } else {
    items.push(element("li", {}, "Data drift: no report yet (python -m drift report)."));
  }
  if (performance) {
    const verdict = performance.degraded ? "degraded" : "holding";
    const live = performance.live_value === null ? "not measured" : formatNumber(performance.live_value);
    items.push(element(
      "li",
      {},
      "Live performance: ",
      element("span", { class: performance.degraded ? "status-bad" : "status-good" }, verdict),
      ` (${performance.metric} ${live} on ${performance.labelled_rows} labelled rows against ` +
        `${formatNumber(performance.reference_value)} at training; version ${performance.version}; ` +
        `${performance.finished_at}).`,
    ));
  } else {
    items.push(element("li", {}, "Live performance: no report yet (python -m drift performance)."));
  }
  return element("ul", {}, ...items);
}

// ---- start ------------------------------------------------------------------------------------------

async function start() {
  byId("page-error").textContent = "";
  try {
    await loadModel();
  } catch (error) {
    if (!(error instanceof AuthNeeded)) byId("page-error").textContent = String(error.message || error);
  }
}

function onKey(event) {
  event.preventDefault();
  const key = byId("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  byId("key-form").hidden = true;
  byId("api-key").value = "";
  start();
}

document.addEventListener("DOMContentLoaded", () => {
  byId("record-form").addEventListener("submit", onPredict);
  byId("file-form").addEventListener("submit", onScoreFile);
  byId("key-form").addEventListener("submit", onKey);
  start();
  setInterval(() => {
    if (state.model) loadModel().catch(() => {});
  }, MODEL_REFRESH_MS);
});
