// snq's dashboard: asks the master for /status.json every second and draws
// it.  No framework and nothing from elsewhere; the charts are plain SVG.
"use strict";

(function () {
  const POLL_MS = 1000;
  // The charts show up to ten minutes, and at least one.
  const WINDOW_S = 600;
  const MIN_WINDOW_S = 60;
  const SVG = "http://www.w3.org/2000/svg";
  // With [monitor] token, open the page as /#token=TOKEN.
  const token = new URLSearchParams(location.hash.slice(1)).get("token");

  let samples = [];
  let lastTime = null;
  // What /status.json hands out for the actions (with the token only).
  let csrf = null;
  // Key ("transport:NAME", "site:NICK") → [[t, handled] ...], for rates.
  const counted = new Map();
  const RATE_WINDOW_S = 30;

  function $(id) { return document.getElementById(id); }

  function number(n) {
    if (n === null || n === undefined) return "–";
    return Math.abs(n) >= 100 || Number.isInteger(n) ? Math.round(n).toLocaleString("en")
      : n.toFixed(1);
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.floor(seconds);
    if (s < 60) return seconds < 10 ? seconds.toFixed(1) + " s" : s + " s";
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
    const m = Math.floor(s / 60) % 60, r = s % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    return m + "m " + String(r).padStart(2, "0") + "s";
  }

  function megabytes(bytes) {
    return bytes === null || bytes === undefined ? "–" : (bytes / 1048576).toFixed(1) + " MB";
  }

  function when(t) {
    return new Date(t * 1000).toLocaleString();
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    // A cell holds text, or elements (the action buttons).
    if (Array.isArray(text)) td.append(...text);
    else td.textContent = text;
    if (className) td.className = className;
    // A long error is cut to one line; all of it shows on hovering.
    if (className === "error") td.title = text;
    row.appendChild(td);
  }

  function fillTable(tbody, items, columns, emptyText) {
    tbody.replaceChildren();
    if (!items.length) {
      const tr = document.createElement("tr");
      cell(tr, emptyText, "empty");
      tr.firstChild.colSpan = tbody.parentNode.tHead.rows[0].cells.length;
      tbody.appendChild(tr);
      return;
    }
    for (const item of items) {
      const tr = document.createElement("tr");
      for (const [text, className] of columns(item)) cell(tr, text, className);
      tbody.appendChild(tr);
    }
  }

  // A rounded top for the y axis: 1, 2 or 5 times a power of ten.
  function niceMax(value) {
    if (value <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (step * power >= value) return step * power;
    }
    return 10 * power;
  }

  function svg(name, attributes, parent) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
    if (parent) parent.appendChild(element);
    return element;
  }

  // series: [[name, [[t, value] ...]] ...]; null values leave a gap.
  function lineChart(chart, series, now) {
    const width = 600, height = 180, left = 44, right = 8, top = 8, bottom = 20;
    const first = samples.length ? samples[0].t : now;
    const span = Math.min(WINDOW_S, Math.max(MIN_WINDOW_S, now - first));
    const start = now - span;
    let max = 0;
    for (const [, points] of series) {
      for (const [, value] of points) if (value !== null && value > max) max = value;
    }
    const scale = niceMax(max);
    const x = (t) => left + (t - start) / span * (width - left - right);
    const y = (v) => top + (1 - v / scale) * (height - top - bottom);
    chart.replaceChildren();
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    chart.setAttribute("preserveAspectRatio", "none");
    for (const fraction of [0, 0.5, 1]) {
      const v = scale * fraction;
      svg("line", {class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v)}, chart);
      svg("text", {x: left - 4, y: y(v) + 4, "text-anchor": "end"}, chart).textContent = number(v);
    }
    for (const [label, t] of [["−" + duration(span), start],
                              ["−" + duration(span / 2), start + span / 2], ["now", now]]) {
      const anchor = t === start ? "start" : t === now ? "end" : "middle";
      svg("text", {x: x(t), y: height - 4, "text-anchor": anchor}, chart).textContent = label;
    }
    let drawn = 0;
    for (const [name, points] of series) {
      // One polyline per unbroken run of values.
      let run = [];
      const flush = () => {
        if (run.length) {
          svg("polyline", {class: name, "data-series": name, points: run.join(" ")}, chart);
          drawn += run.length;
        }
        run = [];
      };
      for (const [t, value] of points) {
        if (t < start) continue;
        if (value === null) { flush(); continue; }
        run.push(x(t).toFixed(1) + "," + y(value).toFixed(1));
      }
      flush();
    }
    chart.dataset.max = String(max);
    chart.dataset.points = String(drawn);
  }

  function merge(history) {
    for (const sample of history) {
      if (lastTime === null || sample.t > lastTime) {
        samples.push(sample);
        lastTime = sample.t;
      }
    }
    const oldest = lastTime - WINDOW_S;
    while (samples.length && samples[0].t < oldest) samples.shift();
  }

  function perSecond(sample, key) {
    return sample.dt > 0 ? sample[key] / sample.dt : 0;
  }

  function render(status) {
    const master = status.master;
    const workers = status.workers;
    const current = workers.filter((w) => w.role === "current");
    const running = workers.filter((w) => w.state === "running").length;
    $("summary").textContent = `master pid ${master.pid}, up ${duration(master.uptime)}, ` +
      `${current.length} workers, queue ${master.queue}`;
    const recent = samples.slice(-10);
    const seconds = recent.reduce((sum, s) => sum + s.dt, 0);
    const handled = recent.reduce((sum, s) => sum + s.handled, 0);
    $("tile-rate").textContent = number(seconds ? handled / seconds : 0);
    $("tile-inflight").textContent = number(workers.reduce((sum, w) => sum + (w.inflight || 0), 0));
    $("tile-workers").textContent = `${running} / ${current.length}`;
    const queue = status.queue || {};
    $("tile-ready").textContent = number(queue.ready);
    $("tile-held").textContent = number(queue.held);
    $("tile-delayed").textContent = number(queue.delayed);
    $("tile-oldest").textContent = status.queue ? duration(queue.oldest || 0) : "–";
    $("tile-dead").textContent = number(queue.dead);

    const now = status.time;
    lineChart($("chart-throughput"), [
      ["handled", samples.map((s) => [s.t, perSecond(s, "handled")])],
      ["errors", samples.map((s) => [s.t, perSecond(s, "errors")])],
    ], now);
    lineChart($("chart-depth"), ["ready", "held", "delayed", "dead"].map(
      (key) => [key, samples.map((s) => [s.t, s[key]])]), now);

    fillTable($("workers").tBodies[0], workers, (w) => [
      [w.role === "current" ? w.id : `${w.id} (${w.role})`],
      [w.pid === null ? "–" : String(w.pid), "num"],
      [w.state, "state-" + w.state],
      [w.substate ? `${w.activity}: ${w.substate}` : (w.activity || "–")],
      [w.uptime === null ? "–" : duration(w.uptime), "num"],
      [megabytes(w.rss), "num"],
      [number(w.inflight), "num"],
      [number(w.handled), "num"],
      [number(w.errors), "num"],
      [number(w.restarts), "num"],
      [w.last_exit || "–"],
    ], "no workers");

    $("dead-summary").textContent = status.queue
      ? `${number(queue.dead)} kept; the newest:` : "";
    fillTable($("dead").tBodies[0], status.dead, (d) => [
      [String(d.id), "num"], [when(d.died)], [d.transport || "–"], [d.site || "–"],
      [d.reason], [String(d.attempts), "num"],
      [[button("retry", {action: "retry", id: d.id}), " ",
        button("purge", {action: "purge", id: d.id})]],
      [d.error, "error"],
    ], status.queue ? "no dead letters" : "not known: this backend does not count");

    renderCluster(status);

    fillTable($("iomanagers").tBodies[0], ioManagerRows(status.iomanagers || {}), (r) => [
      [r.name], [r.key || "–"], [r.worker || "–"],
      [r.state || "–", r.state ? (r.state === "ok" ? "state-running" : "state-exited") : ""],
      [r.detail || "", "error"], [r.events],
    ], "no IoManager runs");
  }

  // A button that POSTs an action (see snq.monitor.actions).
  function button(label, data) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    for (const [key, value] of Object.entries(data)) b.dataset[key] = value;
    if (!csrf) {
      b.disabled = true;
      b.title = "actions need [monitor] token (open the page as /#token=TOKEN)";
    }
    return b;
  }

  async function act(b) {
    const query = new URLSearchParams({do: b.dataset.action});
    for (const key of ["kind", "name", "id"]) {
      if (b.dataset[key] !== undefined) query.set(key, b.dataset[key]);
    }
    const result = $("action-result");
    try {
      const response = await fetch("action?" + query, {
        method: "POST", cache: "no-store",
        headers: {Authorization: "Bearer " + token, "X-Snq-Csrf": csrf},
      });
      const answer = await response.json();
      result.className = answer.ok ? "ok" : "down";
      result.textContent = answer.message;
    } catch (error) {
      result.className = "down";
      result.textContent = error.message;
    }
  }

  document.addEventListener("click", (event) => {
    const b = event.target.closest("button[data-action]");
    if (b && !b.disabled) act(b);
  });

  // Handled per second over the last RATE_WINDOW_S, from counter totals
  // (a daemon's own, or those the cluster's heartbeats carry).
  function rate(key, now, handled) {
    const points = counted.get(key) || [];
    points.push([now, handled]);
    while (points.length > 2 && points[0][0] < now - RATE_WINDOW_S) points.shift();
    counted.set(key, points);
    const [t0, h0] = points[0];
    return now > t0 ? Math.max(handled - h0, 0) / (now - t0) : 0;
  }

  // Counters by transport or site ("transports", "sites"): summed over the
  // live daemons of the cluster, else this daemon's.
  function counters(status, field) {
    const cluster = status.cluster;
    if (!cluster || !cluster.daemons.length) return status[field] || {};
    const sum = {};
    for (const d of cluster.daemons) {
      if (d.liveness !== "live") continue;
      for (const [name, row] of Object.entries(d[field] || {})) {
        const into = sum[name] || (sum[name] = {});
        for (const [counter, n] of Object.entries(row)) into[counter] = (into[counter] || 0) + n;
      }
    }
    return sum;
  }

  function renderCluster(status) {
    const cluster = status.cluster;
    const paused = cluster ? cluster.paused : {transports: [], sites: []};
    $("cluster-summary").textContent = cluster
      ? `${cluster.daemons.filter((d) => d.liveness === "live").length} live in ${cluster.store}`
      : "no registry";
    fillTable($("cluster").tBodies[0], cluster ? cluster.daemons : [], (d) => {
      const workers = d.workers || [];
      const sum = (key) => workers.reduce((total, w) => total + (w[key] || 0), 0);
      return [
        [d.name], [String(d.pid), "num"],
        [d.liveness === "live" ? "live" : `gone (${d.liveness})`,
          d.liveness === "live" ? "state-running" : "state-exited"],
        [duration(Math.max(status.time - d.seen, 0)) + " ago", "num"],
        [`${workers.filter((w) => w.state === "running").length} / ${workers.length}`, "num"],
        [number(sum("handled")), "num"], [number(sum("errors")), "num"],
        [`${d.generation} ${d.digest}`],
      ];
    }, cluster ? "no daemon registered" : "not known: no cluster registry");

    const now = status.time;
    const depths = (status.queue && status.queue.transports) || {};
    const byTransport = counters(status, "transports");
    const names = [...new Set([...Object.keys(byTransport), ...Object.keys(depths),
      ...paused.transports])].sort();
    fillTable($("transports").tBodies[0], names, (name) => {
      const c = byTransport[name] || {}, depth = depths[name];
      const isPaused = paused.transports.includes(name);
      const waiting = depth ? depth.ready + depth.delayed + depth.held : null;
      return [
        [name], [isPaused ? "paused" : "running", isPaused ? "state-waiting" : "state-running"],
        [number(rate("transport:" + name, now, c.handled || 0)), "num"],
        [number(c.error || 0), "num"], [number(waiting), "num"],
        [depth ? duration(depth.oldest || 0) : "–", "num"],
        [[button(isPaused ? "resume" : "pause",
          {action: isPaused ? "resume" : "pause", kind: "transport", name})]],
      ];
    }, "no transport seen yet");

    const bySite = counters(status, "sites");
    const sites = [...new Set([...Object.keys(bySite), ...paused.sites])].sort();
    fillTable($("sites").tBodies[0], sites, (name) => {
      const c = bySite[name] || {};
      const isPaused = paused.sites.includes(name);
      return [
        [name], [isPaused ? "paused" : "running", isPaused ? "state-waiting" : "state-running"],
        [number(rate("site:" + name, now, c.handled || 0)), "num"],
        [number(c.error || 0), "num"],
        [[button(isPaused ? "resume" : "pause",
          {action: isPaused ? "resume" : "pause", kind: "site", name})]],
      ];
    }, "no site seen yet");
  }

  // One row per IoManager and key (a feed, a schedule …): what its worker
  // reports of it, and its events counted so far.
  function ioManagerRows(managers) {
    const rows = [];
    for (const name of Object.keys(managers).sort()) {
      const manager = managers[name];
      const byKey = new Map();
      for (const row of manager.status) byKey.set(row.key || "", {name, ...row});
      for (const key of Object.keys(manager.events)) {
        if (!byKey.has(key)) byKey.set(key, {name, key});
      }
      for (const [key, row] of [...byKey.entries()].sort()) {
        const events = manager.events[key] || {};
        row.events = Object.keys(events).sort().map((e) => `${e} ${number(events[e])}`).join(", ");
        rows.push(row);
      }
    }
    return rows;
  }

  function connection(ok, why) {
    const element = $("connection");
    element.className = ok ? "ok" : "down";
    element.textContent = ok ? "live" : `cannot reach snq: ${why}`;
  }

  async function poll() {
    const url = "status.json" + (lastTime === null ? "" : "?since=" + lastTime);
    try {
      const response = await fetch(url, {
        cache: "no-store",
        headers: token ? {Authorization: "Bearer " + token} : {},
      });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const status = await response.json();
      csrf = status.csrf;
      merge(status.history);
      render(status);
      connection(true);
    } catch (error) {
      connection(false, error.message);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
