// The dashboard preview: draws deploy/grafana/netpol-dashboard.json's panels in their gridPos
// layout, each target evaluated against Prometheus' query_range API (query for the tables),
// with Chart.js. It is not Grafana: `cargo xtask dashboard` uses it to picture the dashboard
// over real lab data because Grafana cannot be installed here. The functions above `run` are
// pure (tested with node's test runner: preview.test.mjs); `run` is the page.

/** Grafana's grid: 24 columns, 30 px rows, 8 px margins. */
export const GRID = { columns: 24, rowHeight: 30, margin: 8 };

/** Every panel, rows' nested panels included, in order. */
export function allPanels(dashboard) {
  const out = [];
  for (const p of dashboard.panels || []) {
    out.push(p);
    for (const q of p.panels || []) out.push(q);
  }
  return out;
}

/** Each panel's box in pixels for a page `width` wide: {panel, left, top, width, height}. */
export function layout(panels, width) {
  const col = (width - GRID.margin) / GRID.columns;
  return panels.map((panel) => {
    const g = panel.gridPos;
    return {
      panel,
      left: Math.round(g.x * col + GRID.margin),
      top: Math.round(g.y * (GRID.rowHeight + GRID.margin) + GRID.margin),
      width: Math.round(g.w * col - GRID.margin),
      height: Math.round(g.h * (GRID.rowHeight + GRID.margin) - GRID.margin),
    };
  });
}

/** The page's height for these boxes. */
export function pageHeight(boxes) {
  return Math.max(0, ...boxes.map((b) => b.top + b.height)) + GRID.margin;
}

/**
 * `expr` with Grafana's variables replaced: `$__rate_interval` by `rateInterval`, `$name` and
 * `${name}` by the variable's value (`All`: its allValue, `.*`).
 */
export function substitute(expr, vars, rateInterval) {
  return expr
    .replace(/\$\{__rate_interval\}|\$__rate_interval/g, rateInterval)
    .replace(/\$\{(\w+)\}|\$(\w+)/g, (m, a, b) => {
      const name = a || b;
      return Object.prototype.hasOwnProperty.call(vars, name) ? vars[name] : m;
    });
}

/** A series' name: the legend format with `{{label}}` replaced by its labels. */
export function seriesName(legendFormat, metric) {
  if (!legendFormat) {
    const labels = Object.entries(metric).filter(([k]) => k !== "__name__");
    return `${metric.__name__ || ""}{${labels.map(([k, v]) => `${k}="${v}"`).join(", ")}}`;
  }
  return legendFormat.replace(/\{\{\s*(\w+)\s*\}\}/g, (_, l) => metric[l] ?? "");
}

/** A value in a panel's unit, short. */
export function formatValue(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const si = (x, suffix) => {
    const a = Math.abs(x);
    for (const [d, p] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (a >= d) return `${+(x / d).toFixed(2)} ${p}${suffix}`;
    return `${+x.toFixed(a < 10 ? 2 : 1)}${suffix ? " " + suffix : ""}`;
  };
  switch (unit) {
    case "pps": return si(v, "p/s");
    case "Bps": return si(v, "B/s");
    case "ops": return si(v, "ops/s");
    case "bytes": {
      const a = Math.abs(v);
      for (const [d, p] of [[2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]]) if (a >= d) return `${+(v / d).toFixed(1)} ${p}`;
      return `${v} B`;
    }
    case "percentunit": return `${+(v * 100).toFixed(v * 100 < 1 ? 3 : 1)}%`;
    case "s": return v < 1 ? `${+(v * 1000).toFixed(1)} ms` : `${+v.toFixed(2)} s`;
    default: return si(v, "");
  }
}

/** A stat's text and colour: the panel's value mappings, else its thresholds. */
export function statDisplay(v, defaults) {
  for (const m of defaults.mappings || []) {
    const hit = m.type === "value" && m.options[String(v)];
    if (hit) return { text: hit.text, color: hit.color || null };
  }
  let color = null;
  for (const s of (defaults.thresholds && defaults.thresholds.steps) || []) {
    if (s.value === null || v >= s.value) color = s.color;
  }
  return { text: formatValue(v, defaults.unit), color };
}

/** A query_range result (`matrix`) as Chart.js datasets of {x: ms, y}. */
export function datasets(result, legendFormat) {
  return result.map((s) => ({
    label: seriesName(legendFormat, s.metric),
    data: s.values.map(([t, v]) => ({ x: t * 1000, y: Number(v) })),
  }));
}

/** The query_range URL of one expression. */
export function rangeUrl(expr, start, end, step) {
  const q = new URLSearchParams({ query: expr, start: String(start), end: String(end), step: String(step) });
  return `/api/v1/query_range?${q}`;
}

const COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a", "#37872d", "#c4162a", "#1f60c4", "#8f3bb8"];
const NAMED = { green: "#73bf69", red: "#f2495c", yellow: "#fade2a", orange: "#ff9830", blue: "#5794f2" };

function hms(ms) {
  return new Date(ms).toISOString().slice(11, 19);
}

async function prom(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (body.status !== "success") throw new Error(`${url}: ${body.error || r.status}`);
  return body.data.result;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function drawTimeseries(box, body, p, range, vars) {
  const sets = [];
  for (const t of p.targets) {
    const expr = substitute(t.expr, vars, range.rateInterval);
    sets.push(...datasets(await prom(rangeUrl(expr, range.start, range.end, range.step)), t.legendFormat));
  }
  const unit = (p.fieldConfig && p.fieldConfig.defaults.unit) || "short";
  const stacked = p.fieldConfig && p.fieldConfig.defaults.custom && p.fieldConfig.defaults.custom.stacking && p.fieldConfig.defaults.custom.stacking.mode === "normal";
  sets.forEach((s, i) => Object.assign(s, { borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length] + "33", borderWidth: 1.5, pointRadius: 0, fill: stacked, tension: 0 }));
  if (sets.length === 0) {
    body.appendChild(el("div", "nodata", "No data"));
    return 0;
  }
  const canvas = el("canvas");
  body.appendChild(canvas);
  new window.Chart(canvas, {
    type: "line",
    data: { datasets: sets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
      plugins: { legend: { position: "bottom", labels: { color: "#ccccdc", boxWidth: 10, boxHeight: 2, font: { size: 10 } } } },
      scales: {
        x: { type: "linear", min: range.start * 1000, max: range.end * 1000, ticks: { color: "#8e8e8e", maxTicksLimit: 6, callback: (v) => hms(v), font: { size: 10 } }, grid: { color: "#2c3235" } },
        y: { stacked, beginAtZero: true, ticks: { color: "#8e8e8e", maxTicksLimit: 5, callback: (v) => formatValue(v, unit), font: { size: 10 } }, grid: { color: "#2c3235" } },
      },
    },
  });
  return sets.length;
}

async function drawStat(body, p, range, vars) {
  const t = p.targets[0];
  const result = await prom(rangeUrl(substitute(t.expr, vars, range.rateInterval), range.start, range.end, range.step));
  const last = result.length ? Number(result[0].values[result[0].values.length - 1][1]) : null;
  const d = statDisplay(last, p.fieldConfig.defaults);
  body.appendChild(el("div", "stat", d.text));
  if (d.color) body.style.background = NAMED[d.color] || d.color;
  return result.length;
}

async function drawTable(body, p, range, vars) {
  const t = p.targets[0];
  const q = new URLSearchParams({ query: substitute(t.expr, vars, range.rateInterval), time: String(range.end) });
  const result = await prom(`/api/v1/query?${q}`);
  const hidden = new Set(Object.keys((p.transformations || []).flatMap((x) => Object.entries((x.options || {}).excludeByName || {})).reduce((o, [k, v]) => (v ? { ...o, [k]: 1 } : o), {})));
  const cols = [...new Set(result.flatMap((s) => Object.keys(s.metric)))].filter((c) => !hidden.has(c));
  const table = el("table");
  const head = el("tr");
  cols.forEach((c) => head.appendChild(el("th", "", c)));
  table.appendChild(head);
  for (const s of result) {
    const tr = el("tr");
    cols.forEach((c) => tr.appendChild(el("td", "", s.metric[c] || "")));
    table.appendChild(tr);
  }
  body.appendChild(table);
  return result.length;
}

/** The page: reads the dashboard, draws every panel, then marks the document done. */
export async function run() {
  const params = new URLSearchParams(location.search);
  const end = Number(params.get("to")) || Math.floor(Date.now() / 1000);
  const start = Number(params.get("from")) || end - 300;
  const step = Number(params.get("step")) || Math.max(1, Math.round((end - start) / 200));
  const range = { start, end, step, rateInterval: params.get("rate") || `${4 * step}s` };
  const dashboard = await (await fetch(params.get("dashboard") || "netpol-dashboard.json")).json();
  const vars = {};
  for (const v of dashboard.templating.list) if (v.type === "query") vars[v.name] = v.allValue || ".*";
  const width = document.documentElement.clientWidth;
  document.getElementById("title").textContent = dashboard.title;
  document.getElementById("range").textContent = `${hms(start * 1000)} - ${hms(end * 1000)} UTC, step ${step} s; node, namespace, pod: All`;
  const boxes = layout(allPanels(dashboard), width);
  const grid = document.getElementById("grid");
  grid.style.height = `${pageHeight(boxes)}px`;
  const failures = [];
  let series = 0;
  for (const b of boxes) {
    const div = el("div", b.panel.type === "row" ? "row" : "panel");
    Object.assign(div.style, { left: `${b.left}px`, top: `${b.top}px`, width: `${b.width}px`, height: `${b.height}px` });
    div.appendChild(el("div", "title", b.panel.title));
    grid.appendChild(div);
    if (b.panel.type === "row") continue;
    const body = el("div", "body");
    div.appendChild(body);
    try {
      if (b.panel.type === "timeseries") series += await drawTimeseries(b, body, b.panel, range, vars);
      else if (b.panel.type === "stat") series += await drawStat(body, b.panel, range, vars);
      else if (b.panel.type === "table") series += await drawTable(body, b.panel, range, vars);
    } catch (e) {
      failures.push(`${b.panel.title}: ${e.message}`);
      body.appendChild(el("div", "nodata", String(e.message)));
    }
  }
  document.body.dataset.series = String(series);
  document.body.dataset.failures = failures.join("\n");
  document.title = failures.length ? "failed" : "rendered";
}

if (typeof window !== "undefined" && typeof document !== "undefined") {
  window.addEventListener("load", () => run().catch((e) => { document.title = "failed"; document.body.dataset.failures = String(e); }));
}
