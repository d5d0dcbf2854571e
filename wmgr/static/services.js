// The services view: the configured services with their state, started, stopped or restarted
// through PUT /services/<name> (the Qserv worker manager's API).
"use strict";
(() => {
  const { api, el, button, seconds } = window.wmgr;
  const $ = (id) => document.getElementById(id);

  function serviceRow(service) {
    const row = el("tr");
    row.dataset.service = service.name;
    const actions = el("td");
    for (const action of ["start", "stop", "restart"]) {
      actions.append(button(action, () => act(service.name, action), "small" + (action === "stop" ? " danger" : "")));
    }
    row.append(el("td", service.name), el("td", service.state, "service-state " + service.state),
      el("td", service.pid === null ? "" : service.pid, "num"),
      el("td", service.uptime === null ? "" : seconds(service.uptime), "num"),
      el("td", service.restarts === null ? "" : service.restarts, "num"), actions);
    return row;
  }

  async function act(name, action) {
    $("services-message").textContent = action + " " + name + "…";
    try {
      const answer = await api("PUT", "/services/" + encodeURIComponent(name), new URLSearchParams({ action }));
      $("services-message").textContent = name + ": " + answer.result.state;
    } catch (e) {
      $("services-message").textContent = name + ": " + action + " failed: " + e.message;
    }
    load();
  }

  async function load() {
    let list;
    try {
      list = (await api("GET", "/services")).results;
    } catch (e) {
      $("services-message").textContent = "Could not list the services: " + e.message;
      return;
    }
    const states = await Promise.all(list.map(async (s) => {
      try {
        return (await api("GET", "/services/" + encodeURIComponent(s.name))).result;
      } catch (e) {
        return { name: s.name, state: "unknown (" + e.message + ")", pid: null, uptime: null, restarts: null };
      }
    }));
    if (!states.length) $("services-message").textContent = "No service is configured.";
    $("services").querySelector("tbody").replaceChildren(...states.map(serviceRow));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("services-refresh").addEventListener("click", load);
  });
  window.wmgr.views["services-view"] = load;
})();
