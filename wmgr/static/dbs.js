// The databases view: the Qserv worker's databases and their tables (GET /dbs, /dbs/<db>/tables).
"use strict";
(() => {
  const { api, el } = window.wmgr;
  const $ = (id) => document.getElementById(id);

  async function load() {
    let dbs;
    try {
      dbs = (await api("GET", "/dbs")).results;
    } catch (e) {
      $("dbs-message").textContent = "Could not list the databases: " + e.message;
      return;
    }
    $("dbs-message").textContent = dbs.length ? "" : "No database.";
    const rows = await Promise.all(dbs.map(async (db) => {
      let tables;
      try {
        tables = (await api("GET", "/dbs/" + encodeURIComponent(db.name) + "/tables")).results.map((t) => t.name);
      } catch (e) {
        tables = ["(" + e.message + ")"];
      }
      const row = el("tr");
      row.dataset.db = db.name;
      row.append(el("td", db.name), el("td", tables.length, "num"), el("td", tables.join(", "), "tables"));
      return row;
    }));
    $("dbs").querySelector("tbody").replaceChildren(...rows);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("dbs-refresh").addEventListener("click", load);
  });
  window.wmgr.views["dbs-view"] = load;
})();
