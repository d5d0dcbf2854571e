// The workers view: this manager's workers (online or offline, enabled or disabled, through
// PATCH /workers/<id>) and Flamenco's tasks with their frames (cancelled through DELETE /tasks/<id>).
"use strict";
(() => {
  const { api, el, button } = window.wmgr;
  const $ = (id) => document.getElementById(id);
  const say = (text) => { $("workers-message").textContent = text; };

  function workerRow(worker) {
    const row = el("tr");
    row.dataset.worker = worker.hostname;
    const enable = worker.status === "enabled" ? "disabled" : "enabled";
    const action = el("td");
    action.append(button(enable === "disabled" ? "disable" : "enable", () => setStatus(worker, enable),
      "small" + (enable === "disabled" ? " danger" : "")));
    row.append(el("td", worker.hostname), el("td", worker.id, "num"),
      el("td", worker.connection, "worker-connection " + worker.connection),
      el("td", worker.status), el("td", worker.ip_address || ""),
      el("td", worker.current_task === null ? "" : worker.current_task, "num"), action);
    return row;
  }

  function taskRow(task) {
    const row = el("tr");
    row.dataset.task = task.id;
    const frames = task.type === "frames";
    const action = el("td");
    if (task.status === "waiting" || task.status === "active") {
      action.append(button("cancel", () => cancel(task.id), "small danger"));
    }
    row.append(el("td", task.id, "num"), el("td", task.type), el("td", task.status, "task-status " + task.status),
      el("td", frames ? task.frame_start + "-" + task.frame_end : ""),
      el("td", frames ? task.frame_current : "", "num"),
      el("td", task.worker_id === null ? "" : task.worker_id, "num"), action);
    return row;
  }

  async function setStatus(worker, status) {
    try {
      await api("PATCH", "/workers/" + worker.id, new URLSearchParams({ status }));
      say(worker.hostname + ": " + status);
    } catch (e) {
      say(worker.hostname + ": " + e.message);
    }
    load();
  }

  async function cancel(id) {
    try {
      const task = await api("DELETE", "/tasks/" + id);
      say("task " + task.id + ": " + task.status);
    } catch (e) {
      say("task " + id + ": cancel failed: " + e.message);
    }
    load();
  }

  async function load() {
    try {
      const [workers, tasks] = await Promise.all([api("GET", "/workers"), api("GET", "/tasks")]);
      const list = Object.values(workers).sort((a, b) => a.hostname.localeCompare(b.hostname));
      $("workers").querySelector("tbody").replaceChildren(...list.map(workerRow));
      $("tasks").querySelector("tbody").replaceChildren(...tasks.map(taskRow));
      if (!list.length && !tasks.length) say("No worker has joined and there is no task.");
    } catch (e) {
      say("Could not list the workers and tasks: " + e.message);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("workers-refresh").addEventListener("click", load);
  });
  window.wmgr.views["workers-view"] = load;
})();
