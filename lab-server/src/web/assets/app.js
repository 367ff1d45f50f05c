// The lab dashboard: renders each page from /api/ JSON and refreshes it on
// every event of the live feed (/api/events, server-sent events): no polling.
// Served by lab-server itself (no CDN, no build step).
"use strict";

const app = document.getElementById("app");
const page = app.dataset.page;
const name = app.dataset.name;
let me = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function when(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toLocaleString();
}

function inTime(ms) {
  if (ms === null || ms === undefined) return "—";
  const s = Math.round((ms - Date.now()) / 1000);
  const abs = Math.abs(s);
  const t = abs < 120 ? `${abs}s` : abs < 7200 ? `${Math.round(abs / 60)}m` : `${Math.round(abs / 3600)}h`;
  return s >= 0 ? `in ${t}` : `${t} ago`;
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  if (r.status === 401) {
    location.href = "/login";
    throw new Error("signed out");
  }
  if (!r.ok) throw new Error(`${r.status}: ${await r.text()}`);
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : null;
}

async function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": me.csrf },
    body: JSON.stringify(body || {}),
  });
}

function table(headers, rows, id) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function link(href, text) {
  return el("a", { href }, text);
}

function stateBadge(s) {
  return el("span", { class: `state ${s}` }, s);
}

function healthBadge(h) {
  return el("span", { class: `health ${h.health}` }, h.health);
}

function problem(e) {
  const p = el("p", { class: "error", role: "alert" }, String(e.message || e));
  app.prepend(p);
  setTimeout(() => p.remove(), 8000);
}

// ------------------------------------------------------------ pages

const render = {
  async hosts() {
    const hosts = await api("/api/hosts");
    app.replaceChildren(el("h1", {}, "Hosts"), table(
      ["Host", "State", "Health", "Holder", "Expires", "Reachable", "Arch", "Rack", "Flags"],
      hosts.map((h) => el("tr", { "data-host": h.name },
        el("td", {}, link(`/hosts/${h.name}`, h.name)),
        el("td", { class: "state-cell" }, stateBadge(h.state)),
        el("td", { class: "health-cell", title: h.health_reason || "" }, healthBadge(h)),
        el("td", { class: "holder" }, h.holder && h.lease ? link(`/leases/${h.lease}`, h.holder) : "—"),
        el("td", {}, inTime(h.expires_at)),
        el("td", { title: h.unreachable_reason || "" }, h.reachable ? "yes" : `no: ${h.unreachable_reason}`),
        el("td", {}, h.arch || "—"),
        el("td", {}, h.rack || "—"),
        el("td", {}, (h.flags || []).join(", ")))), "hosts"));
  },

  async queue() {
    const q = await api("/api/queue");
    const rows = q.map((w) => el("tr", {},
      el("td", {}, w.position),
      el("td", {}, w.waiter),
      el("td", {}, w.project ? `${w.principal} (${w.project})` : w.principal),
      el("td", {}, w.hosts.length ? w.hosts.join(", ") : `${w.count} × ${w.arch || "any"}${w.flags.length ? " [" + w.flags.join(", ") + "]" : ""}`),
      el("td", {}, w.priority),
      el("td", {}, inTime(w.queued_at)),
      el("td", {}, w.held_back ? `held back: ${w.held_back}` : (w.eta ? inTime(w.eta) : "unknown") + (w.waiting_for ? ` (${w.waiting_for})` : "")),
      el("td", {}, w.detached ? "away (restart)" : "waiting")));
    const b = await api("/api/bookings");
    const brow = (x) => el("tr", { "data-booking": x.id },
      el("td", {}, x.id),
      el("td", {}, x.kind),
      el("td", {}, x.holder),
      el("td", {}, x.hosts.join(", ")),
      el("td", {}, inTime(x.start)),
      el("td", {}, inTime(x.end)),
      el("td", {}, x.lease ? link(`/leases/${x.lease}`, "started") : x.started ? "started" : "scheduled"),
      el("td", {}, x.comment || "—"));
    app.replaceChildren(el("h1", {}, "Queue"),
      q.length ? table(["#", "Request", "Who", "Asks for", "Priority", "Queued", "ETA", "Client"], rows, "queue")
        : el("p", { class: "empty" }, "Nobody is waiting."),
      el("h2", {}, "Bookings and maintenance windows"),
      b.length ? table(["Booking", "Kind", "Holder", "Hosts", "Starts", "Ends", "State", "Comment"], b.map(brow), "bookings")
        : el("p", { class: "empty" }, "Nothing is booked."));
  },

  async leases() {
    const l = await api("/api/leases");
    const row = (x) => el("tr", { "data-lease": x.id },
      el("td", {}, link(`/leases/${x.id}`, x.id.slice(0, 8))),
      el("td", {}, x.holder),
      el("td", {}, x.hosts.join(", ")),
      el("td", {}, stateBadge(x.state)),
      el("td", {}, x.profile || "—"),
      el("td", {}, x.provisioning.map((p) => `${p.host}: ${p.phase}${p.stage ? " (" + p.stage + ")" : ""}`).join("; ") || "—"),
      el("td", {}, when(x.granted_at)),
      el("td", {}, x.active ? inTime(x.expires_at) : when(x.ended_at)));
    const heads = ["Lease", "Holder", "Hosts", "State", "Profile", "Provisioning", "Granted", "Expires / ended"];
    app.replaceChildren(
      el("h1", {}, "Active leases"),
      l.active.length ? table(heads, l.active.map(row), "active") : el("p", { class: "empty" }, "No active leases."),
      el("h2", {}, "Recent leases"),
      l.recent.length ? table(heads, l.recent.map(row), "recent") : el("p", { class: "empty" }, "None yet."));
  },

  async lease() {
    const x = await api(`/api/leases/${name}`);
    const actions = el("p", { class: "actions" });
    if (x.may_manage) {
      actions.append(
        el("button", { id: "renew", onclick: () => post(`/api/leases/${x.id}/renew`).then(refresh, problem) }, "Renew"),
        el("button", { id: "release", class: "danger", onclick: () => confirm("Release this lease?") && post(`/api/leases/${x.id}/release`).then(refresh, problem) }, "Release"));
    }
    if (x.may_read_log) {
      actions.append(el("a", { id: "log", class: "button", href: `/api/leases/${x.id}/console.log`, download: `lease-${x.id}-console.log` }, "Download console log"));
    }
    app.replaceChildren(
      el("h1", {}, `Lease ${x.id}`),
      el("dl", {},
        el("dt", {}, "Holder"), el("dd", {}, x.holder),
        el("dt", {}, "State"), el("dd", {}, stateBadge(x.state)),
        el("dt", {}, "Hosts"), el("dd", {}, x.hosts.map((h, i) => [i ? ", " : "", link(`/hosts/${h}`, h)])),
        el("dt", {}, "Profile"), el("dd", {}, x.profile || "—"),
        el("dt", {}, "Priority"), el("dd", {}, x.priority),
        el("dt", {}, "Comment"), el("dd", {}, x.comment || "—"),
        el("dt", {}, "Granted"), el("dd", {}, when(x.granted_at)),
        el("dt", {}, x.active ? "Expires" : "Ended"), el("dd", {}, x.active ? `${when(x.expires_at)} (${inTime(x.expires_at)})` : when(x.ended_at))),
      actions,
      el("h2", {}, "Provisioning"),
      x.provisioning.length ? table(["Host", "Phase", "Stage", "Updated"], x.provisioning.map((p) => el("tr", {},
        el("td", {}, p.host), el("td", {}, stateBadge(p.phase.toLowerCase())), el("td", {}, p.stage), el("td", {}, when(p.updated_at)))), "provisioning")
        : el("p", { class: "empty" }, "No agent drives these hosts."));
  },

  async host() {
    const h = await api(`/api/hosts/${name}`);
    const details = el("dl", { id: "details" },
      el("dt", {}, "State"), el("dd", {}, stateBadge(h.state)),
      el("dt", {}, "Health"), el("dd", { id: "health" }, healthBadge(h),
        h.health_reason ? ` ${h.health_reason}, since ${when(h.health_since)}` : ""),
      el("dt", {}, "Holder"), el("dd", {}, h.holder && h.lease ? link(`/leases/${h.lease}`, h.holder) : "—"),
      el("dt", {}, "Expires"), el("dd", {}, h.expires_at ? `${when(h.expires_at)} (${inTime(h.expires_at)})` : "—"),
      el("dt", {}, "Reachable"), el("dd", {}, h.reachable ? "yes" : `no: ${h.unreachable_reason}`),
      el("dt", {}, "Arch"), el("dd", {}, h.arch || "—"),
      el("dt", {}, "Rack"), el("dd", {}, h.rack || "—"),
      el("dt", {}, "Flags"), el("dd", {}, (h.flags || []).join(", ") || "—"));
    const existing = document.getElementById("details");
    if (existing) {
      // Keep the console and its stream; update the rest.
      existing.replaceWith(details);
      updateConsoleControls(h);
      return;
    }
    const actions = el("p", { class: "actions", id: "host-actions" });
    if (h.may_maintain) {
      actions.append(el("button", { id: "maintenance", onclick: () => {
        const on = !h.maintenance;
        const reason = on ? prompt("Reason for maintenance?") || "" : "";
        post(`/api/hosts/${h.name}/maintenance`, { on, reason }).then(refresh, problem);
      } }, h.maintenance ? "End maintenance" : "Start maintenance"));
      const quarantined = h.health === "quarantined";
      actions.append(el("button", { id: "quarantine", onclick: () => {
        const reason = quarantined ? "" : prompt("Reason for quarantine?") || "";
        post(`/api/hosts/${h.name}/quarantine`, { on: !quarantined, reason }).then(refresh, problem);
      } }, quarantined ? "Release from quarantine" : "Quarantine"));
    }
    const consoleBox = el("section", { id: "console-section" }, el("h2", {}, "Console"));
    app.replaceChildren(el("h1", {}, `Host ${h.name}`), details, actions, consoleBox);
    if (!h.has_console) {
      consoleBox.append(el("p", { class: "empty" }, "This host has no console."));
    } else if (!h.may_view_console) {
      consoleBox.append(el("p", { class: "empty", id: "console-denied" }, "Only the holder of this host's lease (or an operator) may see its console."));
    } else {
      openConsole(h, consoleBox);
    }
    updateConsoleControls(h);
  },
};

function stripAnsi(s) {
  // CSI and OSC sequences, and other control characters but tab and newline.
  return s.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, "").replace(/\x1b\][^\x07]*(\x07|\x1b\\)/g, "")
    .replace(/\r\n/g, "\n").replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
}

let consoleStream = null;

function openConsole(h, box) {
  const pre = el("pre", { id: "console", "aria-live": "polite" });
  const status = el("p", { id: "console-status", class: "hint" }, "connecting…");
  box.append(status, pre);
  // Each (re)connection replays the recent output: the page shows what the
  // newest one sent. The browser reconnects a broken stream by itself, but
  // not one refused (e.g. too many streams open in this session, until an
  // old one is closed): that one is reopened here, waiting longer each time.
  let opened = 0, retry = 2000;
  const connect = () => {
    consoleStream = new EventSource(`/api/hosts/${h.name}/console`);
    consoleStream.addEventListener("open", () => {
      if (opened++ > 0) pre.textContent = "";
      retry = 2000;
      status.textContent = "live (read-only view)";
    });
    consoleStream.addEventListener("output", onOutput);
    consoleStream.addEventListener("notice", (ev) => { status.textContent = ev.data; });
    consoleStream.addEventListener("error", (ev) => {
      const es = ev.target;
      status.textContent = "console stream interrupted; reconnecting…";
      if (es.readyState === EventSource.CLOSED && es === consoleStream) {
        setTimeout(() => { if (es === consoleStream) connect(); }, retry);
        retry = Math.min(retry * 2, 30000);
      }
    });
  };
  const onOutput = (ev) => {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(stripAnsi(JSON.parse(ev.data)));
    // Keep at most ~256 KiB on the page.
    if (pre.textContent.length > 262144) pre.textContent = pre.textContent.slice(-196608);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  };
  connect();
}

function updateConsoleControls(h) {
  const box = document.getElementById("console-section");
  if (!box) return;
  let form = document.getElementById("console-input");
  if (h.may_type && !form) {
    const input = el("input", { id: "console-line", type: "text", autocomplete: "off", placeholder: "type a line; Enter sends it with a carriage return" });
    form = el("form", { id: "console-input", onsubmit: (e) => {
      e.preventDefault();
      post(`/api/hosts/${h.name}/console`, { text: input.value + "\r" }).then(() => { input.value = ""; }, problem);
    } }, input, el("button", { type: "submit" }, "Send"));
    box.append(form);
  } else if (!h.may_type && form) {
    form.remove();
  }
}

// ------------------------------------------------------------ live feed

let pending = null;

function refresh() {
  // Coalesce bursts of events into one reload of the page's data.
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    render[page]().catch(problem);
  }, 100);
}

function feed() {
  const list = document.getElementById("events");
  const live = document.getElementById("live");
  const es = new EventSource("/api/events");
  const show = (ev) => {
    const e = JSON.parse(ev.data);
    const li = el("li", { "data-seq": e.seq },
      el("time", {}, new Date(e.time).toLocaleTimeString()), " ",
      el("strong", {}, e.kind), " ", e.hosts.join(", "), " ", e.actor,
      e.detail ? el("span", { class: "detail" }, ` ${e.detail}`) : null);
    list.prepend(li);
    while (list.children.length > 50) list.lastChild.remove();
  };
  es.addEventListener("open", () => { live.textContent = "●"; live.className = "on"; });
  es.addEventListener("error", () => { live.textContent = "○"; live.className = ""; });
  es.addEventListener("backlog", show);
  es.addEventListener("event", (ev) => { show(ev); refresh(); });
  es.addEventListener("lagged", refresh);
  // Give the connections back when leaving the page: a browser keeps only
  // six HTTP/1.1 connections per server, and a page kept for "back" would
  // hold its streams.
  window.addEventListener("pagehide", () => {
    es.close();
    if (consoleStream) consoleStream.close();
  });
}

async function main() {
  me = await api("/api/me");
  document.getElementById("me").append(
    `${me.principal} (${me.role}) `,
    el("button", { id: "logout", onclick: () => post("/logout").then(() => { location.href = "/login"; }, problem) }, "Sign out"));
  await render[page]();
  feed();
}

main().catch(problem);
