// vcpu-balancer status page: polls /api/state and redraws. Hand-written, no framework, no build step.
"use strict";

const POLL_MS = 1000;          // how often the page asks the controller for its state
const CHART_W = 1000, CHART_H = 220, CHART_PAD = 30;
const COLORS = ["#1565c0", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#4e342e", "#37474f"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmtTime(ms) { return new Date(ms).toLocaleTimeString(); }
function fmtAgo(nowMs, ms) { const s = Math.max(0, Math.round((nowMs - ms) / 1000)); return s < 90 ? s + " s" : Math.round(s / 60) + " min"; }

function describe(a) {
  if (a.type === "move") return "move " + a.domain + " vCPU " + a.vcpu + ": pCPU " + a.from + " \u2192 " + a.to;
  return a.type;
}

function renderHosts(st) {
  const box = document.getElementById("hosts");
  box.replaceChildren();
  for (const h of st.hosts) {
    const over = h.spread !== null && h.spread > st.config.threshold;
    const badge = h.up ? el("span", { class: "badge" + (over ? " over" : "") }, over ? "unbalanced" : "up")
                       : el("span", { class: "badge down" }, "DOWN");
    const card = el("div", { class: "host" + (h.up ? "" : " is-down"), "data-host": h.host, "data-up": String(h.up) },
      el("div", { class: "title" }, el("span", { class: "name" }, h.host), badge),
      el("div", { class: "meta" },
        "round " + h.round + " \u00b7 spread " + (h.spread === null ? "\u2013" : h.spread.toFixed(1)) +
        " \u00b7 " + h.moves_total + " moves \u00b7 " + h.pins_applied_total + " pins" +
        (h.up ? "" : " \u00b7 down for " + fmtAgo(st.now_ms, h.down_since_ms))));
    for (const p of h.pcpus) {
      const vs = h.vcpus.filter(v => v.pcpu === p.id).map(v => v.domain + "/" + v.vcpu).join(" ");
      card.append(el("div", { class: "pcpu", "data-pcpu": String(p.id), title: vs || "no vCPU" },
        el("span", {}, "pCPU " + p.id),
        el("div", { class: "track" }, el("div", { class: "fill pcpu-bar", style: "width:" + Math.min(100, p.usage).toFixed(1) + "%" })),
        el("span", { class: "num" }, p.usage.toFixed(1) + "%")));
    }
    card.append(el("div", { class: "reason" }, describe(h.action) + ": " + h.action.reason));
    box.append(card);
  }
}

function renderDown(st) {
  const down = st.hosts.filter(h => !h.up);
  const box = document.getElementById("down");
  box.hidden = down.length === 0;
  box.replaceChildren();
  if (down.length === 0) return;
  box.append(down.length + (down.length === 1 ? " host is down" : " hosts are down"));
  const ul = el("ul", {});
  for (const h of down) ul.append(el("li", { "data-down-host": h.host }, h.host + ": " + h.action.reason));
  box.append(ul);
}

function renderChart(st) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + CHART_W + " " + CHART_H);
  svg.setAttribute("preserveAspectRatio", "none");
  const series = Object.entries(st.spread_history);
  let t0 = st.now_ms, maxY = Math.max(20, st.config.threshold * 1.5);
  for (const [, pts] of series) for (const [t, y] of pts) { t0 = Math.min(t0, t); maxY = Math.max(maxY, y); }
  const span = Math.max(1, st.now_ms - t0);
  const x = t => CHART_PAD + (t - t0) / span * (CHART_W - 2 * CHART_PAD);
  const y = v => CHART_H - CHART_PAD - v / maxY * (CHART_H - 2 * CHART_PAD);
  const line = (x1, y1, x2, y2, color, dash) => {
    const l = document.createElementNS(ns, "line");
    for (const [k, v] of Object.entries({ x1, y1, x2, y2, stroke: color, "stroke-width": 1 })) l.setAttribute(k, v);
    if (dash) l.setAttribute("stroke-dasharray", "6 4");
    svg.append(l);
  };
  const text = (tx, ty, s, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", tx); t.setAttribute("y", ty); t.setAttribute("font-size", "12"); t.setAttribute("fill", "#666");
    if (anchor) t.setAttribute("text-anchor", anchor);
    t.textContent = s; svg.append(t);
  };
  line(CHART_PAD, y(0), CHART_W - CHART_PAD, y(0), "#999");
  line(CHART_PAD, y(st.config.threshold), CHART_W - CHART_PAD, y(st.config.threshold), "#ef6c00", true);
  text(CHART_W - CHART_PAD, y(st.config.threshold) - 4, "threshold " + st.config.threshold, "end");
  text(4, y(maxY) + 10, maxY.toFixed(0));
  text(4, y(0), "0");
  text(CHART_PAD, CHART_H - 8, fmtTime(t0));
  text(CHART_W - CHART_PAD, CHART_H - 8, fmtTime(st.now_ms), "end");
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  series.forEach(([host, pts], i) => {
    const color = COLORS[i % COLORS.length];
    const pl = document.createElementNS(ns, "polyline");
    pl.setAttribute("points", pts.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" "));
    pl.setAttribute("fill", "none"); pl.setAttribute("stroke", color); pl.setAttribute("stroke-width", "2");
    pl.setAttribute("data-series", host);
    svg.append(pl);
    legend.append(el("span", { style: "--c:" + color }, host));
  });
  document.getElementById("chart").replaceChildren(svg);
}

function renderDecisions(st) {
  const body = document.querySelector("#decisions tbody");
  body.replaceChildren();
  for (const d of st.decisions) {
    body.append(el("tr", { class: d.action.type },
      el("td", {}, fmtTime(d.time_ms)), el("td", {}, d.host), el("td", {}, d.round),
      el("td", { class: "action" }, describe(d.action) + (d.dry_run ? " (dry run)" : "")),
      el("td", { class: "why" }, d.action.reason)));
  }
}

function render(st) {
  const c = st.config, down = st.hosts.filter(h => !h.up).length;
  document.getElementById("summary").textContent =
    st.hosts.length + " hosts, " + down + " down \u00b7 interval " + (c.interval_ms / 1000) + " s \u00b7 threshold " +
    c.threshold + " \u00b7 policy " + c.policy + (c.dry_run ? " \u00b7 DRY RUN" : "") +
    " \u00b7 v" + st.version + " \u00b7 updated " + fmtTime(st.now_ms);
  renderDown(st);
  renderHosts(st);
  renderChart(st);
  renderDecisions(st);
}

async function poll() {
  try {
    const r = await fetch("/api/state", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("conn").textContent = "";
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
  } catch (e) {
    document.getElementById("conn").textContent = "controller unreachable: " + e.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
