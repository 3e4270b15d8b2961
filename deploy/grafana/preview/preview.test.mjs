// Tests of the preview page's pure functions (node --test deploy/grafana/preview/preview.test.mjs).
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { allPanels, datasets, formatValue, layout, pageHeight, rangeUrl, seriesName, statDisplay, substitute } from "./preview.mjs";

const dashboard = JSON.parse(readFileSync(new URL("../netpol-dashboard.json", import.meta.url)));

test("variables and the rate interval are substituted, unknown ones left", () => {
  const e = 'sum by (pod) (rate(m{node=~"$node", pod=~"${pod}", x="$other"}[$__rate_interval]))';
  assert.equal(substitute(e, { node: ".*", pod: "a|b" }, "8s"), 'sum by (pod) (rate(m{node=~".*", pod=~"a|b", x="$other"}[8s]))');
  assert.equal(substitute("x[${__rate_interval}]", {}, "1m"), "x[1m]");
});

test("every panel of the dashboard gets a box inside the page, none overlapping", () => {
  const boxes = layout(allPanels(dashboard), 1400);
  assert.ok(boxes.length >= 20);
  for (const b of boxes) {
    assert.ok(b.left >= 0 && b.left + b.width <= 1400, `${b.panel.title}: ${b.left}+${b.width}`);
    assert.ok(b.width > 0 && b.height > 0);
  }
  for (const a of boxes) for (const b of boxes) {
    if (a === b) continue;
    const apart = a.left + a.width <= b.left || b.left + b.width <= a.left || a.top + a.height <= b.top || b.top + b.height <= a.top;
    assert.ok(apart, `${a.panel.title} overlaps ${b.panel.title}`);
  }
  assert.ok(pageHeight(boxes) > Math.max(...boxes.map((b) => b.top)));
  // Grafana's units: a full-width panel is 24 columns, a row 30 px plus margins.
  const [row] = layout([{ gridPos: { x: 0, y: 0, w: 24, h: 1 } }], 1000);
  assert.deepEqual([row.left, row.width, row.height], [8, 984, 30]);
});

test("series are named by their legend format", () => {
  assert.equal(seriesName("{{namespace}}/{{pod}} {{direction}}", { namespace: "es", pod: "kafka-0", direction: "ingress" }), "es/kafka-0 ingress");
  assert.equal(seriesName("", { __name__: "up", job: "netpol" }), 'up{job="netpol"}');
  const d = datasets([{ metric: { reason: "policy" }, values: [[100, "1.5"], [102, "2"]] }], "{{reason}}");
  assert.deepEqual(d, [{ label: "policy", data: [{ x: 100000, y: 1.5 }, { x: 102000, y: 2 }] }]);
});

test("values are shown in the panel's unit", () => {
  assert.equal(formatValue(1520, "pps"), "1.52 kp/s");
  assert.equal(formatValue(0.0042, "s"), "4.2 ms");
  assert.equal(formatValue(0.25, "percentunit"), "25%");
  assert.equal(formatValue(3.5 * 2 ** 20, "bytes"), "3.5 MiB");
  assert.equal(formatValue(NaN, "short"), "-");
  const ready = dashboard.panels.find((p) => p.title === "Ready").fieldConfig.defaults;
  assert.deepEqual(statDisplay(1, ready), { text: "READY", color: "green" });
  assert.deepEqual(statDisplay(0, ready), { text: "NOT READY", color: "red" });
  assert.equal(statDisplay(3, { unit: "none", thresholds: { steps: [{ color: "green", value: null }, { color: "red", value: 1 }] } }).color, "red");
});

test("the range URL carries the expression and the range", () => {
  const u = new URL(rangeUrl('rate(x{a="b"}[8s])', 10, 70, 2), "http://p");
  assert.equal(u.pathname, "/api/v1/query_range");
  assert.deepEqual(Object.fromEntries(u.searchParams), { query: 'rate(x{a="b"}[8s])', start: "10", end: "70", step: "2" });
});
