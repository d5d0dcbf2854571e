// The connections view: the connection registry's partitions and how many live entries each has
// (GET /connections/partitions). Values reach the page as text only.
"use strict";
(() => {
  const { api, el } = window.wmgr;
  const $ = (id) => document.getElementById(id);

  async function load() {
    const body = $("partitions").querySelector("tbody");
    let data;
    try {
      data = await api("GET", "/connections/partitions");
    } catch (e) {
      $("connections-message").textContent = "Could not list the partitions: " + e.message;
      return;
    }
    $("connections-message").textContent = data.partitions.length
      ? "Entries live " + data.ttl + " s after their last publication."
      : "No partition has been published.";
    body.replaceChildren(...data.partitions.map((p) => {
      const row = el("tr");
      row.append(el("td", p.partition), el("td", p.entries, "num"));
      return row;
    }));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("connections-refresh").addEventListener("click", load);
  });
  window.wmgr.views["connections-view"] = load;
})();
