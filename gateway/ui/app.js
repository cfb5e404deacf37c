// The listenerpool dashboard: polls the control API, tails one session over the WebSocket.
// No framework and no build step; every value from the API is written with textContent.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const MIN_RATE_WINDOW_MS = 1000; // shorter gaps (a refresh right after a click) keep the last rate
  const TAIL_KEEP = 200; // events kept in the live tail
  const TAIL_BACKLOG = 20; // a new tail starts this many events before the session's seq
  const TOKEN_KEY = "listenerpool.apiToken";
  // The page is served at <root>/ui/, so the API is at <root>/v1 (the gateway may be mounted).
  const ROOT = location.pathname.replace(/\/ui\/(index\.html)?$/, "");

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const state = {
    offset: 0,
    limit: 50,
    nextOffset: null,
    total: 0,
    sessions: [],
    rates: new Map(), // sid -> {seq, at, rate}
    rows: new Map(), // sid -> <tr>
    needToken: false,
    timer: null,
    running: false,
    again: false,
    tail: null,
  };

  // -- API -------------------------------------------------------------------------------------
  function apiToken() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const token = apiToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(ROOT + path, init);
    } catch (err) {
      throw new ApiError(0, "unreachable", `${method} ${path}: no answer from the gateway (${err.message})`);
    }
    const text = await resp.text();
    let payload = null;
    try {
      payload = text ? JSON.parse(text) : null;
    } catch {
      payload = null;
    }
    if (!resp.ok) {
      const e = payload && payload.error;
      const message = e ? e.message : `${method} ${path} answered HTTP ${resp.status}`;
      throw new ApiError(resp.status, e ? e.code : `http_${resp.status}`, message);
    }
    return payload;
  }

  const sessionPath = (sid) => `/v1/sessions/${encodeURIComponent(sid)}`;

  // -- messages --------------------------------------------------------------------------------
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
    setStatus("error", "bad");
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = `status ${kind || ""}`;
  }

  function handleError(err) {
    if (err instanceof ApiError && err.status === 401) {
      askToken(err.message);
      return;
    }
    showError(err.message || String(err));
  }

  // -- API token -------------------------------------------------------------------------------
  function askToken(reason) {
    state.needToken = true;
    clearTimeout(state.timer);
    $("token-reason").textContent = `The gateway answered 401: ${reason}. Enter an API token.`;
    $("token-form").hidden = false;
    $("forget-token").hidden = !apiToken();
    setStatus("needs an API token", "bad");
    $("token-input").focus();
  }

  function useToken(event) {
    event.preventDefault();
    const input = $("token-input");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    $("token-form").hidden = true;
    $("forget-token").hidden = false;
    state.needToken = false;
    clearError();
    refresh();
    const tail = state.tail;
    if (tail && tail.waitingForToken) {
      tail.waitingForToken = false;
      connectTail(tail);
    }
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
    refresh();
  }

  // -- refresh ---------------------------------------------------------------------------------
  async function refresh() {
    if (state.running) {
      state.again = true;
      return;
    }
    clearTimeout(state.timer);
    if (state.needToken) return;
    state.running = true;
    try {
      const query = `offset=${state.offset}&limit=${state.limit}`;
      const [workers, page] = await Promise.all([
        api("GET", "/v1/workers"),
        api("GET", `/v1/sessions?${query}`),
      ]);
      renderWorkers(workers.workers);
      if (page.sessions.length === 0 && state.offset > 0) {
        state.offset = 0; // the page emptied (sessions reaped): go back to the first
        state.again = true;
      }
      state.sessions = page.sessions;
      state.total = page.total;
      state.nextOffset = page.next_offset;
      updateRates(page.sessions);
      renderSessions();
      if (state.tail) await refreshDetail(state.tail);
      clearError();
      setStatus(`updated ${new Date().toLocaleTimeString()}`, "ok");
    } catch (err) {
      handleError(err);
    } finally {
      state.running = false;
    }
    if (state.again) {
      state.again = false;
      refresh();
    } else if (!state.needToken) {
      state.timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  // Events/s of each session on the page, from its seq now and at an earlier refresh.
  function updateRates(sessions) {
    const now = performance.now();
    for (const s of sessions) {
      const prev = state.rates.get(s.sid);
      if (!prev || s.seq < prev.seq) {
        state.rates.set(s.sid, { seq: s.seq, at: now, rate: null });
      } else if (now - prev.at >= MIN_RATE_WINDOW_MS) {
        const rate = ((s.seq - prev.seq) * 1000) / (now - prev.at);
        state.rates.set(s.sid, { seq: s.seq, at: now, rate });
      }
    }
  }

  // -- workers ---------------------------------------------------------------------------------
  function renderWorkers(workers) {
    const body = $("workers").tBodies[0];
    body.replaceChildren(
      ...workers.map((w) => {
        const tr = document.createElement("tr");
        tr.dataset.worker = w.id;
        for (const value of [w.id, w.host, w.load, w.capacity, `${w.heartbeat_age_s.toFixed(1)} s`]) {
          tr.append(cell(String(value)));
        }
        return tr;
      }),
    );
    $("worker-count").textContent = `(${workers.length})`;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  // -- sessions --------------------------------------------------------------------------------
  const COLUMNS = ["sid", "state", "owner", "epoch", "seq", "rate", "retries", "last_error"];

  function renderSessions() {
    const needle = $("filter").value.trim().toLowerCase();
    const shown = state.sessions.filter(
      (s) =>
        !needle ||
        [s.sid, s.state, s.owner, s.last_error].some((v) => String(v).toLowerCase().includes(needle)),
    );
    const body = $("sessions").tBodies[0];
    const keep = new Set(shown.map((s) => s.sid));
    for (const [sid, tr] of state.rows) {
      if (!keep.has(sid)) {
        tr.remove();
        state.rows.delete(sid);
      }
    }
    // Rows are updated in place (keyed by session), so their buttons survive a refresh.
    for (const s of shown) {
      let tr = state.rows.get(s.sid);
      if (!tr) {
        tr = sessionRow(s.sid);
        state.rows.set(s.sid, tr);
      }
      const rate = state.rates.get(s.sid);
      const values = {
        ...s,
        state: s.desired ? s.state : `${s.state} (cancelled)`,
        rate: rate && rate.rate !== null ? rate.rate.toFixed(1) : "–",
      };
      COLUMNS.forEach((name, i) => {
        tr.cells[i].textContent = String(values[name]);
      });
      tr.classList.toggle("tailed", Boolean(state.tail && state.tail.sid === s.sid));
      tr.querySelector("button.cancel").disabled = !s.desired;
      body.append(tr); // moves an existing row into page order
    }
    const last = state.offset + state.sessions.length;
    $("session-count").textContent = `(${state.total})`;
    $("page-info").textContent = state.sessions.length
      ? `${state.offset + 1}–${last} of ${state.total}${needle ? `, ${shown.length} match` : ""}`
      : `none of ${state.total}`;
    $("prev-page").disabled = state.offset === 0;
    $("next-page").disabled = state.nextOffset === null;
  }

  function sessionRow(sid) {
    const tr = document.createElement("tr");
    tr.dataset.sid = sid;
    for (const name of COLUMNS) tr.append(cell("", name));
    const actions = document.createElement("td");
    const tail = document.createElement("button");
    tail.type = "button";
    tail.className = "tail";
    tail.textContent = "Tail";
    tail.addEventListener("click", () => startTail(sid));
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "cancel";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", () => cancelSession(sid));
    actions.append(tail, cancel);
    tr.append(actions);
    return tr;
  }

  async function cancelSession(sid) {
    if (!window.confirm(`Cancel session ${sid}? Its reader stops, wherever it runs.`)) return;
    try {
      await api("DELETE", sessionPath(sid));
      setStatus(`cancelled ${sid}`, "ok");
    } catch (err) {
      handleError(err);
      return;
    }
    refresh();
  }

  function changePage(offset) {
    state.offset = Math.max(0, offset);
    refresh();
  }

  // -- live tail -------------------------------------------------------------------------------
  function startTail(sid) {
    stopTail();
    const tail = { sid, ws: null, lastSeq: null, stopped: false, attempts: 0, timer: null };
    state.tail = tail;
    $("tail-panel").hidden = false;
    $("tail-sid").textContent = sid;
    $("tail").replaceChildren();
    $("tail-detail").replaceChildren();
    showTailError("");
    renderSessions();
    connectTail(tail);
  }

  function stopTail() {
    const tail = state.tail;
    if (!tail) return;
    tail.stopped = true;
    clearTimeout(tail.timer);
    if (tail.ws) tail.ws.close(1000, "tail stopped");
    state.tail = null;
    setTailState("stopped");
    renderSessions();
  }

  // Errors of the tail stay up (a refresh does not clear them) until the tail restarts.
  function showTailError(message) {
    $("tail-error").textContent = message;
    $("tail-error").hidden = !message;
  }

  function setTailState(text, kind) {
    const el = $("tail-state");
    el.textContent = text;
    el.className = `status ${kind || ""}`;
  }

  async function refreshDetail(tail) {
    try {
      renderDetail(await api("GET", sessionPath(tail.sid)));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        setTailState("the session no longer exists", "bad");
        return;
      }
      throw err;
    }
  }

  function renderDetail(s) {
    const fields = [
      ["url", s.url],
      ["desired", s.desired ? "yes" : "no (cancelled)"],
      ["state", s.state],
      ["owner", s.owner || "–"],
      ["epoch", s.epoch],
      ["seq", s.seq],
      ["retries", s.retries],
      ["last error", s.last_error || "–"],
      ["last upstream id", s.last_id || "–"],
      ["since", s.since_ms ? new Date(s.since_ms).toLocaleString() : "–"],
    ];
    $("tail-detail").replaceChildren(
      ...fields.flatMap(([k, v]) => {
        const dt = document.createElement("dt");
        dt.textContent = k;
        const dd = document.createElement("dd");
        dd.textContent = String(v);
        dd.dataset.field = k;
        return [dt, dd];
      }),
    );
  }

  // The WebSocket cannot carry an Authorization header, so it authenticates with ?token=: a
  // subscribe token for this session, or (when the gateway has no signing key and answers 409)
  // the API token itself, which the gateway also accepts there and masks in its logs.
  async function streamToken(sid) {
    try {
      const issued = await api("POST", `${sessionPath(sid)}/subscribe-token`, {});
      return { token: issued.token, how: "subscribe token" };
    } catch (err) {
      if (err instanceof ApiError && err.status === 409 && err.code === "signing_disabled") {
        const token = apiToken();
        return { token, how: token ? "API token (no signing key)" : "no token" };
      }
      throw err;
    }
  }

  async function connectTail(tail) {
    setTailState("connecting");
    let auth;
    try {
      if (tail.lastSeq === null) {
        const s = await api("GET", sessionPath(tail.sid));
        renderDetail(s);
        tail.lastSeq = Math.max(0, s.seq - TAIL_BACKLOG);
      }
      auth = await streamToken(tail.sid);
    } catch (err) {
      if (tail.stopped) return;
      if (err instanceof ApiError && err.status === 401) {
        tail.waitingForToken = true;
        setTailState("waiting for an API token", "bad");
        handleError(err);
      } else if (err instanceof ApiError && err.status === 404) {
        setTailState("unknown session", "bad");
        showTailError(err.message);
      } else {
        showTailError(err.message);
        retryTail(tail, "no stream");
      }
      return;
    }
    if (tail.stopped) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${location.host}${ROOT}${sessionPath(tail.sid)}/events?after=${tail.lastSeq}`;
    if (auth.token) url += `&token=${encodeURIComponent(auth.token)}`;
    const ws = new WebSocket(url);
    tail.ws = ws;
    ws.onopen = () => {
      setTailState(`live (${auth.how})`, "ok");
      showTailError("");
    };
    ws.onmessage = (msg) => onFrame(tail, msg.data);
    ws.onclose = (ev) => {
      if (tail.ws !== ws) return;
      tail.ws = null;
      if (!tail.stopped) onTailClosed(tail, ev);
    };
  }

  // Close codes: 4000 + an HTTP status for refusals (tokens are checked on connect, and each
  // connect gets a fresh one, so a refusal will not pass on a retry), 4503 Redis down, 1013
  // too slow (resume at once from the last seq shown).
  function onTailClosed(tail, ev) {
    const why = `${ev.code}${ev.reason ? ` ${ev.reason}` : ""}`;
    if (ev.code >= 4400 && ev.code < 4500) {
      setTailState("refused", "bad");
      showTailError(`The gateway refused the live tail of ${tail.sid}: ${why}`);
      return;
    }
    showTailError(`The live tail closed: ${why}`);
    retryTail(tail, `closed: ${ev.code}`);
  }

  function retryTail(tail, why) {
    const delay = tail.attempts === 0 ? 0 : Math.min(10000, 500 * 2 ** tail.attempts);
    tail.attempts += 1;
    setTailState(`${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`, "bad");
    tail.timer = setTimeout(() => {
      if (!tail.stopped) connectTail(tail);
    }, delay);
  }

  function onFrame(tail, text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      showTailError(`a frame that is not JSON: ${text.slice(0, 80)}`);
      return;
    }
    if (frame.type === "reset") {
      appendTail(null, `history starts at seq ${frame.first_seq}: events after ${frame.after} before it are gone`);
      return;
    }
    tail.attempts = 0; // events flow: the next drop retries at once
    if (tail.lastSeq !== null && frame.seq <= tail.lastSeq) return; // already shown
    tail.lastSeq = frame.seq;
    appendTail(frame);
  }

  function appendTail(frame, notice) {
    const list = $("tail");
    const follow = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    const li = document.createElement("li");
    if (frame) {
      li.dataset.seq = String(frame.seq);
      const data = String(frame.data);
      li.append(
        span(String(frame.seq), "seq"),
        span(`e${frame.epoch}`, "epoch"),
        span(frame.event, "event"),
        span(data.length > 300 ? `${data.slice(0, 300)}…` : data, "data"),
      );
    } else {
      li.className = "notice";
      li.textContent = notice;
    }
    list.append(li);
    while (list.children.length > TAIL_KEEP) list.firstElementChild.remove();
    if (follow) list.scrollTop = list.scrollHeight;
  }

  function span(text, className) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  // -- start -----------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", useToken);
    $("forget-token").addEventListener("click", forgetToken);
    $("forget-token").hidden = !apiToken();
    $("filter").addEventListener("input", renderSessions);
    $("page-size").addEventListener("change", (ev) => {
      state.limit = Number(ev.target.value);
      changePage(0);
    });
    $("prev-page").addEventListener("click", () => changePage(state.offset - state.limit));
    $("next-page").addEventListener("click", () => {
      if (state.nextOffset !== null) changePage(state.nextOffset);
    });
    $("tail-stop").addEventListener("click", stopTail);
    state.limit = Number($("page-size").value);
    refresh();
  });
})();
