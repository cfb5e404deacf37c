// The listenerpool dashboard: polls the control API, tails sessions over one WebSocket.
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
    tails: new Map(), // sid -> {sid, lastSeq, el}, in the order they were started
    stream: { ws: null, tokenSids: null, attempts: 0, timer: null, generation: 0, waitingForToken: false },
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
    if (state.stream.waitingForToken) {
      state.stream.waitingForToken = false;
      connectStream();
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
      await refreshDetails();
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
      tr.classList.toggle("tailed", isTailed(s.sid));
      tr.querySelector("button.tail").textContent = isTailed(s.sid) ? "Stop tail" : "Tail";
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
    tail.addEventListener("click", () => toggleTail(sid));
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

  // -- live tails ------------------------------------------------------------------------------
  // Every tailed session shares one WebSocket to /v1/stream: subscribe and unsubscribe frames
  // add and drop sessions; on a reconnect each is subscribed again after its last seq shown.
  function isTailed(sid) {
    return state.tails.has(sid);
  }

  function toggleTail(sid) {
    if (isTailed(sid)) stopTail(sid);
    else startTail(sid);
  }

  async function startTail(sid) {
    const tail = { sid, lastSeq: null, el: tailCard(sid) };
    state.tails.set(sid, tail);
    $("tail-panel").hidden = false;
    $("tails").append(tail.el.section);
    setCardState(tail, "starting");
    renderSessions();
    try {
      const s = await api("GET", sessionPath(sid));
      if (state.tails.get(sid) !== tail) return;
      renderDetail(tail, s);
      tail.lastSeq = Math.max(0, s.seq - TAIL_BACKLOG);
    } catch (err) {
      if (state.tails.get(sid) !== tail) return;
      if (err instanceof ApiError && err.status === 404) {
        setCardState(tail, "unknown session", "bad");
        return;
      }
      handleError(err);
      tail.lastSeq = 0;
    }
    subscribe(tail);
  }

  function stopTail(sid) {
    const tail = state.tails.get(sid);
    if (!tail) return;
    state.tails.delete(sid);
    tail.el.section.remove();
    const stream = state.stream;
    if (stream.ws && stream.ws.readyState === WebSocket.OPEN && tail.lastSeq !== null) {
      stream.ws.send(JSON.stringify({ op: "unsubscribe", sid }));
    }
    if (state.tails.size === 0) stopStream();
    renderSessions();
  }

  function stopAllTails() {
    for (const sid of [...state.tails.keys()]) stopTail(sid);
  }

  // Follow a tail on the open connection when its token covers the session; else (re)connect.
  function subscribe(tail) {
    const stream = state.stream;
    const ws = stream.ws;
    const covered = stream.tokenSids === null || stream.tokenSids.has(tail.sid);
    if (ws && ws.readyState === WebSocket.OPEN && covered) {
      sendSubscribe(ws, tail);
    } else if (!ws || !covered) {
      connectStream();
    } // a connection being opened subscribes every tail once open
  }

  function sendSubscribe(ws, tail) {
    setCardState(tail, "subscribing");
    ws.send(JSON.stringify({ op: "subscribe", sid: tail.sid, after: tail.lastSeq }));
  }

  function stopStream() {
    const stream = state.stream;
    clearTimeout(stream.timer);
    stream.generation += 1;
    if (stream.ws) stream.ws.close(1000, "tails stopped");
    stream.ws = null;
    stream.tokenSids = null;
    setTailState("stopped");
    showTailError("");
    $("tail-panel").hidden = true;
  }

  // Errors of the connection stay up (a refresh does not clear them) until it is live again.
  function showTailError(message) {
    $("tail-error").textContent = message;
    $("tail-error").hidden = !message;
  }

  function setTailState(text, kind) {
    const el = $("tail-state");
    el.textContent = text;
    el.className = `status ${kind || ""}`;
  }

  function tailCard(sid) {
    const section = document.createElement("section");
    section.className = "tail";
    section.dataset.sid = sid;
    const head = document.createElement("h3");
    const stop = document.createElement("button");
    stop.type = "button";
    stop.className = "untail";
    stop.textContent = "Stop";
    stop.addEventListener("click", () => stopTail(sid));
    const stateEl = span("", "status");
    head.append(span(sid, "tail-sid"), " ", stateEl, " ", stop);
    const error = document.createElement("div");
    error.className = "error";
    error.setAttribute("role", "alert");
    error.hidden = true;
    const detail = document.createElement("dl");
    detail.className = "tail-detail";
    const list = document.createElement("ol");
    list.className = "tail-events";
    section.append(head, error, detail, list);
    return { section, state: stateEl, error, detail, list };
  }

  function setCardState(tail, text, kind) {
    tail.el.state.textContent = text;
    tail.el.state.className = `status ${kind || ""}`;
  }

  function showCardError(tail, message) {
    tail.el.error.textContent = message;
    tail.el.error.hidden = !message;
  }

  async function refreshDetails() {
    for (const tail of [...state.tails.values()]) {
      try {
        renderDetail(tail, await api("GET", sessionPath(tail.sid)));
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) {
          setCardState(tail, "the session no longer exists", "bad");
          continue;
        }
        throw err;
      }
    }
  }

  function renderDetail(tail, s) {
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
    tail.el.detail.replaceChildren(
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

  // A WebSocket cannot carry an Authorization header, so the stream authenticates with ?token=:
  // a subscribe token naming every tailed session, or (when the gateway has no signing key and
  // answers 409) the API token itself, which the gateway also accepts there and masks in its
  // logs. ``sids`` null: the token opens any session.
  async function streamToken(sids) {
    try {
      const issued = await api("POST", "/v1/subscribe-token", { sessions: sids });
      return { token: issued.token, how: "subscribe token", sids: new Set(sids) };
    } catch (err) {
      if (err instanceof ApiError && err.status === 409 && err.code === "signing_disabled") {
        const token = apiToken();
        return { token, how: token ? "API token (no signing key)" : "no token", sids: null };
      }
      throw err;
    }
  }

  async function connectStream() {
    const stream = state.stream;
    clearTimeout(stream.timer);
    stream.generation += 1;
    const generation = stream.generation;
    if (stream.ws) stream.ws.close(1000, "reconnecting with another token");
    stream.ws = null;
    const sids = [...state.tails.values()].filter((t) => t.lastSeq !== null).map((t) => t.sid);
    if (sids.length === 0) return;
    setTailState("connecting");
    let auth;
    try {
      auth = await streamToken(sids);
    } catch (err) {
      if (generation !== stream.generation) return;
      if (err instanceof ApiError && err.status === 401) {
        stream.waitingForToken = true;
        setTailState("waiting for an API token", "bad");
        handleError(err);
      } else if (err instanceof ApiError && err.status === 404) {
        // A tailed session is gone: drop it from the token's list and try again.
        for (const sid of sids) {
          if (err.message.includes(`'${sid}'`)) {
            const tail = state.tails.get(sid);
            if (tail) {
              setCardState(tail, "unknown session", "bad");
              tail.lastSeq = null;
            }
          }
        }
        showTailError(err.message);
        retryStream("no stream");
      } else {
        showTailError(err.message);
        retryStream("no stream");
      }
      return;
    }
    if (generation !== stream.generation) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${location.host}${ROOT}/v1/stream`;
    if (auth.token) url += `?token=${encodeURIComponent(auth.token)}`;
    const ws = new WebSocket(url);
    stream.ws = ws;
    stream.tokenSids = auth.sids;
    ws.onopen = () => {
      setTailState(`live (${auth.how})`, "ok");
      showTailError("");
      for (const tail of state.tails.values()) {
        if (tail.lastSeq === null) continue;
        if (auth.sids === null || auth.sids.has(tail.sid)) sendSubscribe(ws, tail);
      }
      // Tails added while this connection was being set up, outside its token: one more.
      if ([...state.tails.values()].some((t) => t.lastSeq !== null && auth.sids && !auth.sids.has(t.sid))) {
        connectStream();
      }
    };
    ws.onmessage = (msg) => onFrame(msg.data);
    ws.onclose = (ev) => {
      if (stream.ws !== ws) return;
      stream.ws = null;
      if (state.tails.size > 0) onStreamClosed(ev);
    };
  }

  // Close codes: 4000 + an HTTP status for refusals (tokens are checked on connect, and each
  // connect gets a fresh one, so a refusal will not pass on a retry), 4503 Redis down or the
  // gateway full, 1013 too slow (resume at once from the last seqs shown).
  function onStreamClosed(ev) {
    const why = `${ev.code}${ev.reason ? ` ${ev.reason}` : ""}`;
    if (ev.code >= 4400 && ev.code < 4500) {
      setTailState("refused", "bad");
      showTailError(`The gateway refused the live tails: ${why}`);
      return;
    }
    showTailError(`The live tails' connection closed: ${why}`);
    retryStream(`closed: ${ev.code}`);
  }

  function retryStream(why) {
    const stream = state.stream;
    const delay = stream.attempts === 0 ? 0 : Math.min(10000, 500 * 2 ** stream.attempts);
    stream.attempts += 1;
    setTailState(`${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`, "bad");
    clearTimeout(stream.timer);
    stream.timer = setTimeout(() => {
      if (state.tails.size > 0) connectStream();
    }, delay);
  }

  const FRAME_ERRORS = {
    unknown_session: "unknown session",
    forbidden: "not in the subscribe token",
  };

  function onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      showTailError(`a frame that is not JSON: ${text.slice(0, 80)}`);
      return;
    }
    const tail = state.tails.get(frame.sid);
    if (frame.op === "error") {
      if (!tail) {
        showTailError(`${frame.code}: ${frame.message}`);
        return;
      }
      setCardState(tail, FRAME_ERRORS[frame.code] || "refused", "bad");
      showCardError(tail, `${frame.code}: ${frame.message}`);
      return;
    }
    if (!tail) return; // a session stopped meanwhile
    if (frame.op === "subscribed") {
      setCardState(tail, "live", "ok");
      showCardError(tail, "");
      return;
    }
    if (frame.op === "reset") {
      appendTail(tail, null, `history starts at seq ${frame.first_seq}: events after ${frame.after} before it are gone`);
      tail.lastSeq = Math.max(tail.lastSeq, frame.first_seq - 1);
      return;
    }
    if (frame.op) return; // unsubscribed
    state.stream.attempts = 0; // events flow: the next drop retries at once
    if (tail.lastSeq !== null && frame.seq <= tail.lastSeq) return; // already shown
    tail.lastSeq = frame.seq;
    appendTail(tail, frame);
  }

  function appendTail(tail, frame, notice) {
    const list = tail.el.list;
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
    $("tail-stop").addEventListener("click", stopAllTails);
    state.limit = Number($("page-size").value);
    refresh();
  });
})();
