// taskledger /ui: the live parts, in plain JavaScript (no inline scripts: the pages'
// Content-Security-Policy allows only this file).
"use strict";

(function () {
  const HEADERS = { "X-Requested-With": "taskledger-ui", Accept: "text/html" };

  async function fetchFragment(url, signal) {
    const response = await fetch(url, { credentials: "same-origin", headers: HEADERS, signal });
    if (response.status === 401) {
      // The session ended (signed out elsewhere, expired, key revoked): the page
      // reloads, and the server sends it to sign in.
      window.location.reload();
      return null;
    }
    if (!response.ok) {
      throw new Error("HTTP " + response.status);
    }
    return response.text();
  }

  // The task list's rows, refreshed every few seconds (not while the tab is hidden, nor
  // while focus is inside them: a replaced row would lose it).
  function refreshRows(body) {
    const url = body.dataset.refresh;
    async function tick() {
      if (!document.hidden && !body.contains(document.activeElement)) {
        try {
          const html = await fetchFragment(url);
          if (html !== null) {
            body.innerHTML = html;
          }
        } catch (error) {
          // Try again at the next tick.
        }
      }
      window.setTimeout(tick, 3000);
    }
    window.setTimeout(tick, 3000);
  }

  // A task's status, long-polled: the server answers as soon as the task changes (or
  // after a while without a change), and the next poll starts from that version.
  function followStatus(live) {
    const base = live.dataset.poll;
    async function poll() {
      const current = live.querySelector("#task-status");
      const version = current ? current.dataset.version : "0";
      try {
        const html = await fetchFragment(base + "?version=" + encodeURIComponent(version));
        if (html === null) {
          return;
        }
        const box = document.createElement("div");
        box.innerHTML = html;
        const next = box.querySelector("#task-status");
        if (next && current && next.dataset.version !== current.dataset.version) {
          current.replaceWith(next);
        }
        window.setTimeout(poll, 100);
      } catch (error) {
        window.setTimeout(poll, 5000);
      }
    }
    poll();
  }

  document.addEventListener("DOMContentLoaded", function () {
    const rows = document.getElementById("task-rows");
    if (rows && rows.dataset.refresh) {
      refreshRows(rows);
    }
    const live = document.getElementById("task-status-live");
    if (live && live.dataset.poll) {
      followStatus(live);
    }
  });
})();
