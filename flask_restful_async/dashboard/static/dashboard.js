// The task dashboard of flask_restful_async: no framework, no build step.
// It reads api/tasks (a page of tasks and the counts by state), listens to the
// list URL's event stream where the page has one, and cancels or forgets tasks
// with DELETE on their status URLs.
"use strict";

(function () {
  const root = document.getElementById("dashboard");
  if (!root) return;

  const tasksUrl = root.dataset.tasksUrl;
  const streamUrl = root.dataset.streamUrl || null;
  const pageSize = Number(root.dataset.pageSize) || 25;
  const POLL_MS = 2000; // without a stream
  const RESYNC_MS = 30000; // with one: counts and order, in case an event was missed
  const ACTIVE = new Set(["queued", "running"]);
  // The counts cost more than a page (an operator's go through every task): asked
  // for at most this often, however busy the stream.
  const COUNTS_MS = 2000;

  const rows = document.getElementById("rows");
  const empty = document.getElementById("empty");
  const live = document.getElementById("live");
  const problem = document.getElementById("problem");
  const newer = document.getElementById("newer");
  const older = document.getElementById("older");
  const pageNumber = document.getElementById("page-number");
  const template = document.getElementById("row-template");
  const detail = document.getElementById("detail");
  const detailTitle = document.getElementById("detail-title");
  const detailBody = document.getElementById("detail-body");

  const view = {
    filter: new URLSearchParams(location.search).get("state") || "",
    cursors: [], // the cursors of the pages before this one
    cursor: null, // this page's
    next: null,
  };
  const shown = new Map(); // task id -> {task, row}
  let refreshTimer = null;
  let source = null; // the EventSource of the page shown
  let pollTimer = null;
  let loading = false;
  let countedAt = -Infinity;
  let countsTimer = null;
  let again = false;

  // -- formatting -------------------------------------------------------------

  function seconds(iso) {
    return iso ? Date.parse(iso) / 1000 : null;
  }

  function ago(iso) {
    const delta = Math.max(0, Date.now() / 1000 - seconds(iso));
    if (delta < 5) return "just now";
    if (delta < 60) return Math.floor(delta) + " s ago";
    if (delta < 3600) return Math.floor(delta / 60) + " min ago";
    if (delta < 86400) return Math.floor(delta / 3600) + " h ago";
    return Math.floor(delta / 86400) + " d ago";
  }

  function span(total) {
    if (total < 1) return Math.round(total * 1000) + " ms";
    if (total < 60) return total.toFixed(1) + " s";
    const minutes = Math.floor(total / 60);
    if (minutes < 60) return minutes + " min " + Math.floor(total % 60) + " s";
    return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
  }

  function duration(task) {
    const started = seconds(task.started_at);
    if (started === null) return "–";
    const finished = seconds(task.finished_at);
    return span(Math.max(0, (finished === null ? Date.now() / 1000 : finished) - started));
  }

  function number(value) {
    return Number.isInteger(value) ? String(value) : value.toFixed(1);
  }

  // -- the table --------------------------------------------------------------

  function makeRow(task) {
    const row = template.content.firstElementChild.cloneNode(true);
    row.dataset.id = task.id;
    row.tabIndex = 0;
    row.addEventListener("click", function (event) {
      if (!event.target.closest("button")) openDetail(row.dataset.id);
    });
    row.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && event.target === row) openDetail(row.dataset.id);
    });
    row.querySelector(".cancel").addEventListener("click", function () {
      remove(row.dataset.id, "cancel");
    });
    row.querySelector(".forget").addEventListener("click", function () {
      remove(row.dataset.id, "forget");
    });
    return row;
  }

  function paint(row, task) {
    const state = task.state;
    row.className = "task state-" + state;
    const badge = row.querySelector(".badge");
    badge.textContent = task.cancel_requested && ACTIVE.has(state) ? "cancelling" : state;
    const request = task.request || {};
    row.querySelector(".method").textContent = request.method || "";
    row.querySelector(".path").textContent = request.path || "";
    row.querySelector(".id").textContent = task.id;
    const owner = row.querySelector(".owner");
    if (owner) owner.textContent = task.owner === null || task.owner === undefined ? "–" : task.owner;
    const time = row.querySelector("time");
    time.dateTime = task.created_at;
    time.title = task.created_at;
    time.textContent = ago(task.created_at);
    row.querySelector(".duration").textContent = duration(task);

    const bar = row.querySelector("progress");
    const text = row.querySelector(".progress-text");
    const progress = task.progress;
    if (progress && progress.total > 0 && isFinite(progress.total)) {
      bar.max = progress.total;
      bar.value = Math.max(0, Math.min(progress.current, progress.total));
      // A handler's numbers, as it gave them: shown within 0 to 100 %.
      const ratio = isFinite(progress.current) ? progress.current / progress.total : 1;
      const percent = Math.floor(100 * Math.max(0, Math.min(1, ratio)));
      text.textContent = percent + "%" + (progress.message ? " · " + progress.message : "");
      bar.hidden = false;
    } else if (state === "running") {
      bar.removeAttribute("value"); // indeterminate: it runs, how far is not known
      bar.hidden = false;
      text.textContent = progress
        ? number(progress.current) + (progress.message ? " · " + progress.message : "")
        : "";
    } else if (state === "succeeded") {
      bar.max = 1;
      bar.value = 1;
      bar.hidden = false;
      text.textContent = progress && progress.message ? progress.message : "";
    } else {
      bar.hidden = state !== "queued";
      bar.max = 1;
      bar.value = 0;
      text.textContent = progress && progress.message ? progress.message : "";
    }

    const active = ACTIVE.has(state) && !task.expired;
    const cancel = row.querySelector(".cancel");
    cancel.hidden = !active;
    cancel.disabled = Boolean(task.cancel_requested);
    row.querySelector(".forget").hidden = active;
  }

  function render(tasks) {
    const seen = new Set();
    let previous = null;
    for (const task of tasks) {
      seen.add(task.id);
      let entry = shown.get(task.id);
      if (!entry) {
        entry = { task: task, row: makeRow(task) };
        shown.set(task.id, entry);
      }
      entry.task = task;
      paint(entry.row, task);
      const place = previous ? previous.nextSibling : rows.firstChild;
      if (place !== entry.row) rows.insertBefore(entry.row, place);
      previous = entry.row;
    }
    for (const [id, entry] of shown) {
      if (!seen.has(id)) {
        entry.row.remove();
        shown.delete(id);
      }
    }
    empty.hidden = shown.size > 0;
  }

  function paintCounts(counts) {
    let total = 0;
    let active = 0;
    for (const name in counts) {
      total += counts[name];
      if (ACTIVE.has(name)) active += counts[name];
      const cell = root.querySelector('[data-count="' + name + '"]');
      if (cell) cell.textContent = counts[name];
    }
    root.querySelector('[data-count=""]').textContent = total;
    document.title = (active ? "(" + active + ") " : "") + "Tasks";
  }

  function paintFilter() {
    for (const button of root.querySelectorAll(".counts button")) {
      button.setAttribute("aria-pressed", String(button.dataset.state === view.filter));
    }
  }

  function paintPager() {
    newer.disabled = view.cursors.length === 0;
    older.disabled = !view.next;
    pageNumber.textContent = "Page " + (view.cursors.length + 1);
  }

  function tell(message) {
    problem.textContent = message || "";
    problem.hidden = !message;
  }

  // -- reading ----------------------------------------------------------------

  // The page's query: api/tasks and the list URL's stream take the same.
  function pageQuery() {
    const query = new URLSearchParams({ limit: String(pageSize) });
    if (view.filter) query.set("state", view.filter);
    if (view.cursor) query.set("cursor", view.cursor);
    return query;
  }

  async function load() {
    if (loading) {
      again = true;
      return;
    }
    loading = true;
    const query = pageQuery();
    const counting = performance.now() - countedAt >= COUNTS_MS;
    if (!counting) query.set("counts", "0");
    try {
      const answer = await fetch(tasksUrl + "?" + query, {
        headers: { Accept: "application/json" },
      });
      if (!answer.ok) {
        tell("The server answered " + answer.status + "; trying again.");
        return;
      }
      const data = await answer.json();
      tell("");
      if (view.cursor && data.tasks.length === 0) {
        // The task this page starts after is gone (forgotten, expired): the page
        // would read empty though older tasks remain. Back to the first page.
        view.cursors = [];
        view.cursor = null;
        again = true;
        return;
      }
      view.next = data.next;
      render(data.tasks);
      if (data.counts) {
        countedAt = performance.now();
        paintCounts(data.counts);
      } else if (countsTimer === null) {
        countsTimer = setTimeout(function () {
          countsTimer = null;
          soon(); // the counts, a little later
        }, COUNTS_MS);
      }
      paintPager();
    } catch (error) {
      tell("The server cannot be reached; trying again.");
    } finally {
      loading = false;
      if (again) {
        again = false;
        soon();
      }
    }
  }

  // Many events in a burst make one read.
  function soon() {
    if (refreshTimer === null) {
      refreshTimer = setTimeout(function () {
        refreshTimer = null;
        load();
      }, 250);
    }
  }

  function poll(every) {
    clearInterval(pollTimer);
    pollTimer = setInterval(function () {
      if (!document.hidden) load();
    }, every);
  }

  // -- live -------------------------------------------------------------------

  function onStatus(event) {
    let task;
    try {
      task = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    if (!task || !task.id) return;
    const entry = shown.get(task.id);
    if (entry) {
      const changed = entry.task.state !== task.state;
      entry.task = Object.assign({}, entry.task, task);
      paint(entry.row, entry.task);
      if (changed) soon(); // counts, and perhaps the filter
    } else if (view.cursors.length === 0) {
      soon(); // a new task, at the top of the first page
    }
  }

  function polling() {
    live.textContent = "updated every " + POLL_MS / 1000 + " s";
    live.className = "live polling";
    poll(POLL_MS);
  }

  // The stream follows the tasks of the page shown: made anew for another page.
  function listen() {
    if (source !== null) source.close();
    source = null;
    if (!streamUrl || typeof EventSource === "undefined") {
      polling();
      return;
    }
    const opened = new EventSource(streamUrl + "?" + pageQuery());
    source = opened;
    opened.addEventListener("open", function () {
      live.textContent = "live";
      live.className = "live on";
      poll(RESYNC_MS);
    });
    opened.addEventListener("status", onStatus);
    opened.addEventListener("done", soon);
    opened.addEventListener("error", function () {
      if (opened !== source) return;
      if (opened.readyState === EventSource.CLOSED) {
        // Not a stream after all: read the page every few seconds instead.
        polling();
      } else {
        live.textContent = "reconnecting…";
        live.className = "live off";
        poll(POLL_MS);
      }
    });
  }

  // -- acting -----------------------------------------------------------------

  async function remove(id, how) {
    const entry = shown.get(id);
    if (!entry) return;
    const button = entry.row.querySelector(how === "cancel" ? ".cancel" : ".forget");
    button.disabled = true;
    try {
      // Cancel never forgets: a DELETE of a task that finished since the row was
      // painted would delete its result. The dashboard's cancel answers 409 then.
      const answer =
        how === "cancel"
          ? await fetch(tasksUrl + "/" + encodeURIComponent(id) + "/cancel", {
              method: "POST",
              headers: { Accept: "application/json", "Content-Type": "application/json" },
              body: "{}",
            })
          : await fetch(entry.task.url, {
              method: "DELETE",
              headers: { Accept: "application/json" },
            });
      if (how === "cancel" && answer.status === 409) {
        tell("The task finished before it could be cancelled.");
        soon();
      } else if (answer.status === 204 || answer.status === 404) {
        entry.row.remove();
        shown.delete(id);
        empty.hidden = shown.size > 0;
      } else if (answer.ok) {
        const task = await answer.json();
        entry.task = Object.assign({}, entry.task, task);
        paint(entry.row, entry.task);
      } else {
        tell("Could not " + how + " the task: the server answered " + answer.status + ".");
        button.disabled = false;
      }
    } catch (error) {
      tell("Could not " + how + " the task: the server cannot be reached.");
      button.disabled = false;
    }
    soon();
  }

  // -- the detail -------------------------------------------------------------

  function element(tag, className, text) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (text !== undefined) made.textContent = text;
    return made;
  }

  function field(list, name, value) {
    list.append(element("dt", "", name), element("dd", "", value));
  }

  let detailOf = null; // the task the dialog shows: a late answer about another is dropped

  async function openDetail(id) {
    const entry = shown.get(id);
    detailOf = id;
    detailTitle.textContent = "Task " + id;
    detailBody.replaceChildren(element("p", "muted", "Loading…"));
    if (!detail.open) detail.showModal();
    let data;
    try {
      const answer = await fetch(tasksUrl + "/" + encodeURIComponent(id), {
        headers: { Accept: "application/json" },
      });
      if (detailOf !== id) return;
      if (!answer.ok) {
        detailBody.replaceChildren(element("p", "problem", "The server answered " + answer.status + "."));
        return;
      }
      data = await answer.json();
    } catch (error) {
      if (detailOf !== id) return;
      detailBody.replaceChildren(element("p", "problem", "The server cannot be reached."));
      return;
    }
    if (detailOf !== id || !detail.open) return;
    const task = data.task;
    const facts = element("dl", "facts");
    field(facts, "State", task.state + (task.cancel_requested ? " (cancellation requested)" : ""));
    if (task.request) field(facts, "Request", task.request.method + " " + task.request.path);
    if (task.endpoint) field(facts, "Endpoint", task.endpoint);
    if ("owner" in task) field(facts, "Owner", task.owner === null ? "–" : task.owner);
    field(facts, "Status URL", task.url + " answers " + data.answer);
    field(facts, "Created", task.created_at + " (" + ago(task.created_at) + ")");
    field(facts, "Duration", duration(task));
    const parts = [facts, element("h3", "", "Status document")];
    const doc = Object.assign({}, task);
    for (const extra of ["url", "owner", "endpoint", "expired"]) delete doc[extra];
    parts.push(element("pre", "code", JSON.stringify(doc, null, 2)));
    const response = data.response;
    if (response) {
      parts.push(element("h3", "", "Response " + response.status));
      const headers = element("table", "headers");
      for (const [name, value] of response.headers) {
        const row = element("tr");
        row.append(element("th", "", name), element("td", "", value));
        headers.append(row);
      }
      parts.push(headers);
      if (response.body === null) {
        parts.push(element("p", "muted", response.size + " bytes, not text"));
      } else {
        parts.push(element("pre", "code body", response.body));
        if (response.truncated) {
          parts.push(element("p", "muted", "The first 4 KiB of " + response.size + " bytes."));
        }
      }
    } else if (task.expired) {
      parts.push(element("p", "muted", "The result has expired."));
    } else if (entry && ACTIVE.has(task.state)) {
      parts.push(element("p", "muted", "No response yet."));
    }
    detailBody.replaceChildren(...parts);
  }

  // -- wiring -----------------------------------------------------------------

  function go(filter) {
    view.filter = filter;
    view.cursors = [];
    view.cursor = null;
    const query = new URLSearchParams(location.search);
    if (filter) query.set("state", filter);
    else query.delete("state");
    const search = query.toString();
    history.replaceState(null, "", location.pathname + (search ? "?" + search : ""));
    paintFilter();
    load();
    listen();
  }

  for (const button of root.querySelectorAll(".counts button")) {
    button.addEventListener("click", function () {
      go(button.dataset.state);
    });
  }
  older.addEventListener("click", function () {
    if (!view.next) return;
    view.cursors.push(view.cursor);
    view.cursor = view.next;
    load();
    listen();
  });
  newer.addEventListener("click", function () {
    if (view.cursors.length === 0) return;
    view.cursor = view.cursors.pop();
    load();
    listen();
  });
  document.getElementById("detail-close").addEventListener("click", function () {
    detail.close();
  });
  detail.addEventListener("click", function (event) {
    if (event.target === detail) detail.close(); // a click on the backdrop
  });

  // Relative times and running durations move on their own.
  setInterval(function () {
    for (const entry of shown.values()) {
      const time = entry.row.querySelector("time");
      time.textContent = ago(entry.task.created_at);
      if (entry.task.state === "running") {
        entry.row.querySelector(".duration").textContent = duration(entry.task);
      }
    }
  }, 1000);

  // A state the page does not know (a link edited by hand, or of another
  // version) shows every task, rather than a list the server refuses (400).
  const states = Array.from(root.querySelectorAll(".counts button"), function (button) {
    return button.dataset.state;
  });
  if (states.indexOf(view.filter) === -1) {
    go("");
  } else {
    paintFilter();
    load();
    listen();
  }
})();
